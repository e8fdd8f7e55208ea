//! `lb agent`: the backend host's side of the fleet (Ananta's host agent, Beamer's backend
//! module). It receives the muxes' encapsulated packets, checks where they come from and where
//! they go, and writes the inner packet into a TUN device, so the kernel delivers it to the
//! server listening on the VIP (which sits on `lo`). The server's reply leaves with the VIP as
//! source, straight to the router: direct server return.
//!
//! **Receive path.** An AF_PACKET TPACKET_V3 ring on `node.interface` (IP-in-IP, IPv6-in-IP,
//! the mixed-family forms and GRE, over IPv4 or IPv6, all in one place), plus raw sockets for
//! protocols 4, 41 and 47 with a drop-everything filter: they exist only so that the kernel does
//! not answer each tunnel packet with ICMP "protocol unreachable".
//!
//! **The decision** ([`classify`], pure):
//! 1. Not a tunnel packet to one of this host's addresses: not ours, ignored (host traffic).
//! 2. The outer source is not one of `agent.muxes`: rejected and counted. Otherwise anyone could
//!    inject traffic for a VIP. The one exception: another backend of the config chaining a
//!    packet here (a tunnel packet without a key, step 4), which is delivered and never chained
//!    again.
//! 3. The inner destination is not a VIP of the config: rejected and counted.
//! 4. **Daisy chaining (Beamer).** A GRE key carries the [`backend_tag`] of the flow's previous
//!    backend, set by a mux for a slot whose backend changed within its window. A TCP packet
//!    that is not a SYN, for a connection this host does not have (the kernel's socket table,
//!    asked through sock_diag), is sent on once to that previous backend, in GRE without a key,
//!    so it cannot bounce again. What asks the kernel ([`Connections`]) may answer "cannot
//!    tell now": the packet is then dropped as [`Reject::LookupBudget`]. A SYN carrying a key
//!    is delivered (the connection starts here) and [`Connections::connection_starts`] is told.
//!    The costs a flood of spoofed non-SYN segments could impose here are bounded by
//!    [`crate::chain_guard`].
//! 5. Otherwise it is delivered: written into the TUN.
//!
//! **Production alternative.** On hosts whose kernel has ipip/gre devices, the kernel can
//! decapsulate instead (`ip link add ... type ipip/gre`, the VIP on `lo`, rp_filter loose). The
//! agent still adds what the kernel does not: accepting only the muxes, checking the VIP, and
//! daisy chaining.
//!
//! **Invariants.** Nothing panics on packet input; every rejected packet has a reason and a
//! counter; a packet is chained at most once (chained packets carry no key).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use lb_core::config::Config;
use lb_core::encap::{DecapError, decapsulate};
use lb_core::packet::{self, Kind, Link, ParseError};
use lb_core::snapshot::backend_tag;

/// Why the agent refused a tunnel packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    /// The tunnel or inner packet is malformed or truncated.
    Malformed,
    /// The outer (or the inner) IPv4 header checksum is wrong.
    BadChecksum,
    /// The outer source is not a configured mux.
    ForeignSource,
    /// The inner destination is not a configured VIP.
    UnknownVip,
    /// A chaining candidate needed a kernel socket lookup, and this second's lookup budget
    /// (`agent.chain_lookups_per_second`) was spent: dropped (the sender retransmits).
    LookupBudget,
    /// A packet to chain, and this second's relay budget (`agent.chain_relays_per_second`) was
    /// spent: dropped.
    RelayBudget,
}

impl Reject {
    /// Every reason, in counter order.
    pub const ALL: [Self; 6] = [
        Self::Malformed,
        Self::BadChecksum,
        Self::ForeignSource,
        Self::UnknownVip,
        Self::LookupBudget,
        Self::RelayBudget,
    ];

    /// Its position in [`Reject::ALL`] (and in the counters).
    #[must_use]
    pub fn index(self) -> usize {
        match self {
            Self::Malformed => 0,
            Self::BadChecksum => 1,
            Self::ForeignSource => 2,
            Self::UnknownVip => 3,
            Self::LookupBudget => 4,
            Self::RelayBudget => 5,
        }
    }

    /// Its key in `lb status` (`counters.rejected_…`).
    #[must_use]
    pub fn status_key(self) -> &'static str {
        match self {
            Self::Malformed => "rejected_malformed",
            Self::BadChecksum => "rejected_bad_checksum",
            Self::ForeignSource => "rejected_foreign_source",
            Self::UnknownVip => "rejected_unknown_vip",
            Self::LookupBudget => "rejected_lookup_budget",
            Self::RelayBudget => "rejected_relay_budget",
        }
    }

    /// The counter's name (`lb_agent_rejected_total{reason="…"}`, `rejected_…` in status).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadChecksum => "bad_checksum",
            Self::ForeignSource => "foreign_source",
            Self::UnknownVip => "unknown_vip",
            Self::LookupBudget => "lookup_budget",
            Self::RelayBudget => "relay_budget",
        }
    }
}

/// What [`classify`] asks about this host's TCP connections.
pub trait Connections {
    /// Whether this host has a TCP connection with that local (VIP) and remote (client) end:
    /// `None` when it cannot tell now (the lookup budget is spent).
    fn has_connection(&mut self, local: SocketAddr, remote: SocketAddr) -> Option<bool>;

    /// A SYN of that pair, carrying a previous backend, is being delivered here: the connection
    /// starts on this host, so an earlier "absent" answer is stale.
    fn connection_starts(&mut self, local: SocketAddr, remote: SocketAddr) {
        let _ = (local, remote);
    }
}

/// A plain function answers every question (tests, or no budget).
impl<F: FnMut(SocketAddr, SocketAddr) -> bool> Connections for F {
    fn has_connection(&mut self, local: SocketAddr, remote: SocketAddr) -> Option<bool> {
        Some(self(local, remote))
    }
}

/// What to do with one received IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Not a tunnel packet for this host: leave it to the kernel.
    NotOurs,
    /// Drop and count.
    Reject(Reject),
    /// Write the inner packet into the TUN.
    Deliver(&'a [u8]),
    /// Send the inner packet on to the previous backend `to` (GRE, no key).
    Chain {
        /// The inner packet.
        inner: &'a [u8],
        /// The previous backend.
        to: IpAddr,
    },
    /// Delivered locally although it carried a previous backend this host does not know.
    DeliverUnknownPrevious(&'a [u8]),
    /// Delivered locally: chained here by another backend (this host is the previous one).
    DeliverChained(&'a [u8]),
}

/// What [`classify`] checks against, built from the config.
#[derive(Clone, Debug)]
pub struct Policy {
    addresses: Vec<IpAddr>,
    my_tags: Vec<u32>,
    muxes: Vec<IpNet>,
    /// The other backends: they may chain a packet here (GRE without a key).
    peers: BTreeSet<IpAddr>,
    vips: BTreeSet<IpAddr>,
    previous: HashMap<u32, IpAddr>,
    chaining: bool,
}

impl Policy {
    /// The policy of the agent the config describes: its addresses are `node.address_v4/v6`,
    /// which must be a backend of at least one VIP.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let agent = config
            .agent
            .as_ref()
            .ok_or("the config has no [agent] section")?;
        let addresses: Vec<IpAddr> = [config.node.address_v4, config.node.address_v6]
            .into_iter()
            .flatten()
            .collect();
        let backends: BTreeSet<IpAddr> = config
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.address))
            .collect();
        if !addresses.iter().any(|a| backends.contains(a)) {
            return Err(format!(
                "node.address_v4/address_v6 ({addresses:?}) is not a backend of any VIP: the agent would receive nothing"
            ));
        }
        let mut previous = HashMap::new();
        for &b in &backends {
            if let Some(other) = previous.insert(backend_tag(b), b) {
                return Err(format!(
                    "backends {other} and {b} have the same 32-bit tag: daisy chaining could not tell them apart; rename one"
                ));
            }
        }
        let peers = backends
            .iter()
            .copied()
            .filter(|b| !addresses.contains(b))
            .collect();
        Ok(Self {
            my_tags: addresses.iter().map(|&a| backend_tag(a)).collect(),
            addresses,
            peers,
            muxes: agent.muxes.clone(),
            vips: config.vips.iter().map(|v| v.address).collect(),
            previous,
            chaining: agent.chaining,
        })
    }

    /// This host's addresses.
    #[must_use]
    pub fn addresses(&self) -> &[IpAddr] {
        &self.addresses
    }

    /// The accepted mux prefixes.
    #[must_use]
    pub fn muxes(&self) -> &[IpNet] {
        &self.muxes
    }
}

/// Decides what to do with `packet` (starting at its outer IP header). `connections` answers
/// whether this host has a TCP connection with a local (VIP) and remote (client) end; it is
/// asked only for chaining candidates, and told of SYNs that carry a previous backend.
pub fn classify<'a>(
    packet: &'a [u8],
    policy: &Policy,
    connections: &mut dyn Connections,
) -> Verdict<'a> {
    let tunnel = match decapsulate(packet) {
        Ok(t) => t,
        Err(DecapError::OuterNotIp { .. } | DecapError::UnsupportedProtocol { .. }) => {
            return Verdict::NotOurs;
        }
        Err(e) => {
            // Malformed, but only ours to count if it was addressed to us.
            let reason = if matches!(e, DecapError::OuterChecksum { .. }) {
                Reject::BadChecksum
            } else {
                Reject::Malformed
            };
            return match outer_destination(packet) {
                Some(dst) if policy.addresses.contains(&dst) => Verdict::Reject(reason),
                _ => Verdict::NotOurs,
            };
        }
    };
    if !policy.addresses.contains(&tunnel.outer_dst) {
        return Verdict::NotOurs;
    }
    let from_mux = policy.muxes.iter().any(|n| n.contains(&tunnel.outer_src));
    // Another backend may pass on a packet it was sent by mistake (daisy chaining); such a
    // packet never carries a key (GRE without one, or IP-in-IP), so it cannot be passed on again.
    let chained_here =
        !from_mux && tunnel.gre_key.is_none() && policy.peers.contains(&tunnel.outer_src);
    if !from_mux && !chained_here {
        return Verdict::Reject(Reject::ForeignSource);
    }
    let inner = match packet::parse(tunnel.inner, Link::Ip) {
        Ok(inner) => inner,
        Err(ParseError::BadChecksum { .. }) => return Verdict::Reject(Reject::BadChecksum),
        Err(_) => return Verdict::Reject(Reject::Malformed),
    };
    let Some(inner_flow) = inner.kind.flow() else {
        return Verdict::Reject(Reject::Malformed);
    };
    if !policy.vips.contains(&inner_flow.dst()) {
        return Verdict::Reject(Reject::UnknownVip);
    }
    if chained_here {
        return Verdict::DeliverChained(inner.ip);
    }
    let Some(tag) = tunnel
        .gre_key
        .filter(|t| policy.chaining && !policy.my_tags.contains(t))
    else {
        return Verdict::Deliver(inner.ip);
    };
    let Kind::Transport { flow, syn } = inner.kind else {
        return Verdict::Deliver(inner.ip);
    };
    if flow.protocol() != lb_core::flow::PROTO_TCP {
        // UDP has no connection to look up.
        return Verdict::Deliver(inner.ip);
    }
    let local = SocketAddr::new(flow.dst(), flow.dst_port());
    let remote = SocketAddr::new(flow.src(), flow.src_port());
    if syn {
        // A SYN starts a connection here.
        connections.connection_starts(local, remote);
        return Verdict::Deliver(inner.ip);
    }
    match connections.has_connection(local, remote) {
        Some(true) => return Verdict::Deliver(inner.ip),
        Some(false) => {}
        None => return Verdict::Reject(Reject::LookupBudget),
    }
    match policy.previous.get(&tag) {
        Some(&to) => Verdict::Chain {
            inner: inner.ip,
            to,
        },
        None => Verdict::DeliverUnknownPrevious(inner.ip),
    }
}

fn outer_destination(packet: &[u8]) -> Option<IpAddr> {
    crate::device::ip_destination(packet)
}

/// What a received frame that [`packet::parse`] refused with `error` counts as: a rejected
/// tunnel packet when its IP header names one of this host's addresses and a tunnel protocol
/// (4, 41, 47) — a wrong IPv4 header checksum as [`Reject::BadChecksum`], anything else as
/// [`Reject::Malformed`] — and `None` (the host's business, not counted here) otherwise.
#[must_use]
pub fn unparsed(frame: &[u8], link: Link, error: ParseError, policy: &Policy) -> Option<Reject> {
    let ip = frame_ip(frame, link)?;
    let protocol = match ip.first()? >> 4 {
        4 => *ip.get(9)?,
        6 => *ip.get(6)?,
        _ => return None,
    };
    if !matches!(protocol, 4 | 41 | 47) {
        return None;
    }
    let dst = crate::device::ip_destination(ip)?;
    if !policy.addresses.contains(&dst) {
        return None;
    }
    Some(match error {
        ParseError::BadChecksum { .. } => Reject::BadChecksum,
        _ => Reject::Malformed,
    })
}

/// Where the IP header starts in `frame`: after an Ethernet header and up to two VLAN tags.
fn frame_ip(frame: &[u8], link: Link) -> Option<&[u8]> {
    if link == Link::Ip {
        return Some(frame);
    }
    let mut at = 12;
    for _ in 0..3 {
        let ethertype = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?);
        match ethertype {
            0x8100 | 0x88a8 => at += 4,
            packet::ETHERTYPE_IPV4 | packet::ETHERTYPE_IPV6 => return frame.get(at + 2..),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use etherparse::PacketBuilder;
    use lb_core::encap::{EncapKind, EncapParams, encapsulate};

    use super::*;

    const ME: &str = "198.18.21.2";
    const OTHER: &str = "198.18.22.2";
    const MUX: &str = "198.18.11.2";
    const VIP: [u8; 4] = [198, 18, 100, 1];

    fn config(chaining: bool) -> Config {
        Config::from_toml(
            &format!(
                "[node]\naddress_v4 = \"{ME}\"\n[agent]\nmuxes = [\"198.18.11.0/24\"]\nchaining = {chaining}\n\
                 [[vip]]\nname = \"web\"\naddress = \"198.18.100.1\"\nprotocol = \"tcp\"\nport = 80\nencap = \"gre\"\n\
                 [[vip.backend]]\naddress = \"{ME}\"\n[[vip.backend]]\naddress = \"{OTHER}\"\n"
            ),
            "agent.toml",
        )
        .unwrap()
    }

    fn tcp(dst: [u8; 4], syn: bool) -> Vec<u8> {
        let b = PacketBuilder::ipv4([198, 18, 1, 2], dst, 64).tcp(40_000, 80, 1, 1000);
        let b = if syn { b.syn() } else { b.ack(7) };
        let mut out = Vec::new();
        b.write(&mut out, b"GET / HTTP/1.0\r\n\r\n").unwrap();
        out
    }

    fn tunnel(inner: &[u8], src: &str, dst: &str, key: Option<u32>) -> Vec<u8> {
        let mut out = vec![0u8; inner.len() + 64];
        let n = encapsulate(
            inner,
            &EncapParams {
                outer_src: src.parse().unwrap(),
                outer_dst: dst.parse().unwrap(),
                ttl: 64,
                kind: EncapKind::Gre { key },
            },
            &mut out,
        )
        .unwrap();
        out.truncate(n);
        out
    }

    /// A verdict that owns its packet, to compare in assertions.
    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        NotOurs,
        Reject(Reject),
        Deliver(Vec<u8>),
        Chain(Vec<u8>, IpAddr),
        DeliverUnknownPrevious(Vec<u8>),
        DeliverChained(Vec<u8>),
    }

    fn run(packet: &[u8], policy: &Policy, local: bool) -> Owned {
        match classify(packet, policy, &mut |_: SocketAddr, _: SocketAddr| local) {
            Verdict::NotOurs => Owned::NotOurs,
            Verdict::Reject(r) => Owned::Reject(r),
            Verdict::Deliver(p) => Owned::Deliver(p.to_vec()),
            Verdict::Chain { inner, to } => Owned::Chain(inner.to_vec(), to),
            Verdict::DeliverUnknownPrevious(p) => Owned::DeliverUnknownPrevious(p.to_vec()),
            Verdict::DeliverChained(p) => Owned::DeliverChained(p.to_vec()),
        }
    }

    #[test]
    fn delivers_from_muxes_and_rejects_the_rest() {
        let policy = Policy::from_config(&config(true)).unwrap();
        let inner = tcp(VIP, true);
        let ok = tunnel(&inner, MUX, ME, None);
        assert_eq!(run(&ok, &policy, false), Owned::Deliver(inner.clone()));
        let spoofed = tunnel(&inner, "198.18.1.2", ME, None);
        assert_eq!(
            run(&spoofed, &policy, false),
            Owned::Reject(Reject::ForeignSource)
        );
        let not_a_vip = tunnel(&tcp([198, 18, 100, 9], true), MUX, ME, None);
        assert_eq!(
            run(&not_a_vip, &policy, false),
            Owned::Reject(Reject::UnknownVip)
        );
        let for_someone_else = tunnel(&inner, MUX, OTHER, None);
        assert_eq!(run(&for_someone_else, &policy, false), Owned::NotOurs);
        assert_eq!(
            run(&inner, &policy, false),
            Owned::NotOurs,
            "plain TCP is host traffic"
        );
        let mut broken = ok.clone();
        broken.truncate(30);
        broken[2..4].copy_from_slice(&30u16.to_be_bytes());
        // With a right header checksum: malformed, not a checksum error.
        broken[10..12].fill(0);
        let sum = broken[..20]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum::<u32>();
        let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
        broken[10..12].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(
            run(&broken, &policy, false),
            Owned::Reject(Reject::Malformed)
        );
        for n in 0..ok.len() {
            let _ = classify(&ok[..n], &policy, &mut |_: SocketAddr, _: SocketAddr| false);
        }
    }

    #[test]
    fn chains_only_mid_connection_packets_this_host_does_not_have() {
        let policy = Policy::from_config(&config(true)).unwrap();
        let previous = backend_tag(OTHER.parse().unwrap());
        let ack = tcp(VIP, false);
        let keyed = tunnel(&ack, MUX, ME, Some(previous));
        assert_eq!(
            run(&keyed, &policy, false),
            Owned::Chain(ack.clone(), OTHER.parse().unwrap())
        );
        assert!(
            matches!(run(&keyed, &policy, true), Owned::Deliver(_)),
            "local connection"
        );
        let syn = tunnel(&tcp(VIP, true), MUX, ME, Some(previous));
        assert!(
            matches!(run(&syn, &policy, false), Owned::Deliver(_)),
            "a SYN starts here"
        );
        let unknown = tunnel(&ack, MUX, ME, Some(0x1234_5678));
        assert!(matches!(
            run(&unknown, &policy, false),
            Owned::DeliverUnknownPrevious(_)
        ));
        let mine = tunnel(&ack, MUX, ME, Some(backend_tag(ME.parse().unwrap())));
        assert!(
            matches!(run(&mine, &policy, false), Owned::Deliver(_)),
            "never to itself"
        );
        // The previous backend accepts the chained packet (no key) from its peer, once.
        let peer = Policy::from_config(&config(true).tap_address(OTHER)).unwrap();
        let chained = tunnel(&ack, ME, OTHER, None);
        assert_eq!(
            run(&chained, &peer, false),
            Owned::DeliverChained(ack.clone())
        );
        let keyed_from_peer = tunnel(&ack, ME, OTHER, Some(previous));
        assert_eq!(
            run(&keyed_from_peer, &peer, false),
            Owned::Reject(Reject::ForeignSource)
        );
        let off = Policy::from_config(&config(false)).unwrap();
        assert!(
            matches!(run(&keyed, &off, false), Owned::Deliver(_)),
            "chaining off"
        );
    }

    trait TapAddress {
        fn tap_address(self, address: &str) -> Self;
    }

    impl TapAddress for Config {
        fn tap_address(mut self, address: &str) -> Self {
            self.node.address_v4 = Some(address.parse().unwrap());
            self
        }
    }

    #[test]
    fn reject_reasons_are_indexed_in_order() {
        for (i, r) in Reject::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
            assert_eq!(r.status_key(), format!("rejected_{}", r.name()));
        }
    }

    #[test]
    fn bad_checksums_and_spent_budgets_are_rejected_with_their_reason() {
        let policy = Policy::from_config(&config(true)).unwrap();
        let inner = tcp(VIP, true);
        let mut bad = tunnel(&inner, MUX, ME, None);
        bad[10] ^= 0xff;
        assert_eq!(
            run(&bad, &policy, false),
            Owned::Reject(Reject::BadChecksum)
        );
        let mut bad_inner = inner.clone();
        bad_inner[10] ^= 0xff;
        assert_eq!(
            run(&tunnel(&bad_inner, MUX, ME, None), &policy, false),
            Owned::Reject(Reject::BadChecksum)
        );
        // A candidate the connection table cannot answer now is dropped.
        let previous = backend_tag(OTHER.parse().unwrap());
        let keyed = tunnel(&tcp(VIP, false), MUX, ME, Some(previous));
        struct Spent(u32);
        impl Connections for Spent {
            fn has_connection(&mut self, _: SocketAddr, _: SocketAddr) -> Option<bool> {
                None
            }
            fn connection_starts(&mut self, _: SocketAddr, _: SocketAddr) {
                self.0 += 1;
            }
        }
        let mut spent = Spent(0);
        assert_eq!(
            classify(&keyed, &policy, &mut spent),
            Verdict::Reject(Reject::LookupBudget)
        );
        let syn = tunnel(&tcp(VIP, true), MUX, ME, Some(previous));
        assert!(matches!(
            classify(&syn, &policy, &mut spent),
            Verdict::Deliver(_)
        ));
        assert_eq!(spent.0, 1, "a keyed SYN is reported");
    }

    #[test]
    fn unparsable_frames_count_only_when_they_are_tunnel_packets_for_this_host() {
        let policy = Policy::from_config(&config(true)).unwrap();
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = tunnel(&tcp(VIP, false), MUX, ME, None);
        ip[10] ^= 0xff;
        frame.extend_from_slice(&ip);
        let error = packet::parse(&frame, Link::Ethernet).unwrap_err();
        assert!(matches!(error, ParseError::BadChecksum { .. }));
        assert_eq!(
            unparsed(&frame, Link::Ethernet, error, &policy),
            Some(Reject::BadChecksum)
        );
        assert_eq!(
            unparsed(&ip, Link::Ip, error, &policy),
            Some(Reject::BadChecksum)
        );
        let truncated = ParseError::Malformed {
            layer: packet::Layer::Ip,
        };
        assert_eq!(
            unparsed(&ip, Link::Ip, truncated, &policy),
            Some(Reject::Malformed)
        );
        // With a VLAN tag.
        let mut tagged = frame[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0, 7]);
        tagged.extend_from_slice(&frame[12..]);
        assert_eq!(
            unparsed(&tagged, Link::Ethernet, error, &policy),
            Some(Reject::BadChecksum)
        );
        // Plain TCP to this host, or a tunnel packet to another: the host's business.
        let plain = tcp([198, 18, 21, 2], false);
        assert_eq!(unparsed(&plain, Link::Ip, error, &policy), None);
        let elsewhere = tunnel(&tcp(VIP, false), MUX, OTHER, None);
        assert_eq!(unparsed(&elsewhere, Link::Ip, error, &policy), None);
        assert_eq!(unparsed(&[], Link::Ethernet, error, &policy), None);
        assert_eq!(unparsed(&[0u8; 14], Link::Ethernet, error, &policy), None);
    }

    #[test]
    fn an_agent_that_is_no_backend_is_refused() {
        let mut c = config(true);
        c.node.address_v4 = Some(IpAddr::V4(Ipv4Addr::new(198, 18, 29, 9)));
        assert!(
            Policy::from_config(&c)
                .unwrap_err()
                .contains("not a backend")
        );
    }
}
