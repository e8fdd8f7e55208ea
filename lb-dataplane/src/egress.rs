//! Egress SNAT on the backend host: the policy routing that steers the host's outbound
//! connections into the agent's TUN ([`EgressRoutes`]), which packets read from the TUN are
//! egress traffic ([`is_egress`]), and how a connection that gets no SNAT port fails at once
//! ([`refusal`], [`RefusedFlows`]).
//!
//! **Steering.** Table [`EGRESS_TABLE`] (4242) holds a default route into the TUN per family
//! (with `src` = this host's address for IPv6). The rules differ by family, because the kernels'
//! source-address selection does:
//! - **IPv4**: `from <node.address_v4> to <prefix> lookup 4242`, priority 4242, per egress
//!   prefix. An unbound IPv4 socket's connect looks the route up twice, the second time with
//!   the source it chose, so `from` matches it (TCP and connected UDP; an unconnected `sendto`
//!   is routed once, without a source, and is not steered).
//! - **IPv6**: the kernel chooses an unbound socket's source *after* its one route lookup (with
//!   the source unset, which no `from` rule matches), so a `from` rule would only steer sockets
//!   bound to the address. The rule is therefore `iif lo to <prefix> lookup 4242` (every locally
//!   sent packet to the prefix, bound or not, connected or not); the route's `src` gives unbound
//!   sockets this host's address. Two kinds of locally sent packets must not be steered, and
//!   are sent on past the steering rule by rules of priority 4241 (`goto 4243`, where a `nop`
//!   rule stands): packets *from a VIP* (the servers' direct-server-return replies: one rule per
//!   IPv6 VIP or SNAT address, kept up to date on reload), and the agent's own packets
//!   (translated egress packets and chained ones, sent with the firewall mark [`EGRESS_MARK`]).
//!
//! **Ownership and restarts.** The agent owns the rules of priority 4242 that look up table
//! 4242, the rules of priority 4241 that `goto 4243`, and the `nop` rules of priority 4243, in
//! both families. At start it deletes every such rule (an agent killed with SIGKILL leaves its
//! rules behind; the TUN, and with it table 4242's routes, goes with the process), then adds its
//! own; on exit it deletes them. So a restart after a crash starts clean, and at most one agent
//! may run per host (network namespace).
//!
//! **Refusals.** When a host's ports are exhausted (or its SNAT table is full), the backend's
//! connection attempt is answered at once with an ICMP "destination unreachable,
//! administratively prohibited" written back into the TUN, as if from the destination: the
//! kernel fails the `connect` (`EHOSTUNREACH` for IPv4, `EACCES` for IPv6) instead of
//! retransmitting a SYN that goes nowhere. [`RefusedFlows`] counts each refused flow once.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;
use lb_core::flow::FlowKey;
use lb_core::packet::{self, Kind, Link};

/// The routing table egress traffic is steered into the TUN by.
pub const EGRESS_TABLE: u32 = 4242;
/// The firewall mark of the agent's own packets (`SO_MARK` on its raw sockets), which the IPv6
/// steering rules leave alone.
pub const EGRESS_MARK: u32 = 0x4242;
/// Priority of the rules that skip the steering rule (`goto` [`PRIORITY_CONTINUE`]).
pub const PRIORITY_SKIP: u32 = 4241;
/// Priority of the steering rules (`lookup` [`EGRESS_TABLE`]).
pub const PRIORITY_STEER: u32 = 4242;
/// Priority of the `nop` rule the skipping rules jump to.
pub const PRIORITY_CONTINUE: u32 = 4243;

/// What a rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Look the route up in this table.
    Lookup(u32),
    /// Continue at the rule of this priority.
    Goto(u32),
    /// Nothing (a target for `goto`).
    Nop,
}

/// One policy-routing rule of the agent's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// IPv6 (`ip -6`) or IPv4 (`ip -4`).
    pub v6: bool,
    /// Its priority.
    pub priority: u32,
    /// `from`, if any.
    pub from: Option<IpNet>,
    /// `to`, if any.
    pub to: Option<IpNet>,
    /// `iif lo`: locally sent packets only.
    pub local_only: bool,
    /// `fwmark`, if any.
    pub fwmark: Option<u32>,
    /// What it does.
    pub action: Action,
}

impl Rule {
    /// The arguments of `ip` that add (`verb` = "add") or delete ("del") this rule.
    #[must_use]
    pub fn args(&self, verb: &str) -> Vec<String> {
        let mut a: Vec<String> = vec![
            if self.v6 { "-6" } else { "-4" }.into(),
            "rule".into(),
            verb.into(),
            "priority".into(),
            self.priority.to_string(),
        ];
        if let Some(from) = self.from {
            a.extend(["from".into(), from.to_string()]);
        }
        if let Some(to) = self.to {
            a.extend(["to".into(), to.to_string()]);
        }
        if self.local_only {
            a.extend(["iif".into(), "lo".into()]);
        }
        if let Some(mark) = self.fwmark {
            a.extend(["fwmark".into(), format!("{mark:#x}")]);
        }
        match self.action {
            Action::Lookup(t) => a.extend(["lookup".into(), t.to_string()]),
            Action::Goto(p) => a.extend(["goto".into(), p.to_string()]),
            Action::Nop => a.push("nop".into()),
        }
        a
    }
}

/// The rules that steer egress to `egress` into table 4242, in the order they are to be added
/// (what a rule jumps to exists before the rule; the steering rules come last, so nothing is
/// steered before its exceptions are in place). `addresses` are this host's (`node.address_v4`
/// and `_v6`), `vips` every VIP and SNAT address of the config, and `families` the families
/// (IPv4, IPv6) this host has a SNAT table of: prefixes of another family are not steered.
#[must_use]
pub fn rules(
    egress: &[IpNet],
    addresses: &[IpAddr],
    vips: &[IpAddr],
    families: (bool, bool),
) -> Vec<Rule> {
    let mut out = Vec::new();
    let v6_prefixes: Vec<IpNet> = egress
        .iter()
        .copied()
        .filter(|p| p.addr().is_ipv6() && families.1)
        .collect();
    if !v6_prefixes.is_empty() {
        let skip = |from: Option<IpNet>, fwmark: Option<u32>| Rule {
            v6: true,
            priority: PRIORITY_SKIP,
            from,
            to: None,
            local_only: false,
            fwmark,
            action: Action::Goto(PRIORITY_CONTINUE),
        };
        out.push(Rule {
            v6: true,
            priority: PRIORITY_CONTINUE,
            from: None,
            to: None,
            local_only: false,
            fwmark: None,
            action: Action::Nop,
        });
        out.push(skip(None, Some(EGRESS_MARK)));
        let mut v6_vips: Vec<IpAddr> = vips.iter().copied().filter(IpAddr::is_ipv6).collect();
        v6_vips.sort_unstable();
        v6_vips.dedup();
        for vip in v6_vips {
            out.push(skip(Some(IpNet::from(vip)), None));
        }
        for prefix in v6_prefixes {
            out.push(Rule {
                v6: true,
                priority: PRIORITY_STEER,
                from: None,
                to: Some(prefix),
                local_only: true,
                fwmark: None,
                action: Action::Lookup(EGRESS_TABLE),
            });
        }
    }
    for prefix in egress.iter().filter(|p| p.addr().is_ipv4() && families.0) {
        for address in addresses.iter().filter(|a| a.is_ipv4()) {
            out.push(Rule {
                v6: false,
                priority: PRIORITY_STEER,
                from: Some(IpNet::from(*address)),
                to: Some(*prefix),
                local_only: false,
                fwmark: None,
                action: Action::Lookup(EGRESS_TABLE),
            });
        }
    }
    out
}

/// The routes of table 4242: for each family in `rules`, a default route into `tun`, with this
/// host's address of that family (if it has one) as the source unbound sockets take.
#[must_use]
pub fn routes(rules: &[Rule], addresses: &[IpAddr], tun: &str) -> Vec<Vec<String>> {
    [false, true]
        .into_iter()
        .filter(|&v6| rules.iter().any(|r| r.v6 == v6))
        .map(|v6| {
            let mut a: Vec<String> = [
                if v6 { "-6" } else { "-4" },
                "route",
                "replace",
                "default",
                "dev",
                tun,
                "table",
            ]
            .map(str::to_owned)
            .to_vec();
            a.push(EGRESS_TABLE.to_string());
            if let Some(src) = addresses.iter().find(|a| a.is_ipv6() == v6) {
                a.extend(["src".into(), src.to_string()]);
            }
            a
        })
        .collect()
}

/// Runs `ip args`; its stderr on failure.
fn ip(args: &[String]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The most rules of one kind [`remove_stale`] deletes (a bound on the loop).
const MAX_STALE: usize = 100_000;

/// Deletes every rule the agent owns (see the module docs), in both families; returns how many.
/// The agent's own rules from an earlier run that did not end cleanly (SIGKILL, a crash).
pub fn remove_stale() -> usize {
    let mut removed = 0;
    for family in ["-4", "-6"] {
        // Steering rules first: nothing is steered while its exceptions are being removed.
        for selector in [
            vec!["priority", "4242", "table", "4242"],
            vec!["priority", "4241", "goto", "4243"],
            vec!["priority", "4243", "nop"],
        ] {
            let mut args: Vec<String> = vec![family.into(), "rule".into(), "del".into()];
            args.extend(selector.iter().map(|s| (*s).to_owned()));
            // Each `del` removes one rule that matches the given selectors (the others are
            // wildcards); it fails once none is left.
            for _ in 0..MAX_STALE {
                if ip(&args).is_err() {
                    break;
                }
                removed += 1;
            }
        }
    }
    removed
}

/// The agent's policy routing for egress SNAT, in force while this value lives. See the module
/// docs.
#[derive(Debug, Default)]
pub struct EgressRoutes {
    rules: Vec<Rule>,
}

impl EgressRoutes {
    /// Removes stale rules of an earlier agent, then adds `routes` (`ip` arguments) and
    /// `rules`, in order.
    ///
    /// # Errors
    ///
    /// The first `ip` command that failed, with its message; what was added before it is
    /// removed again.
    pub fn install(rules: Vec<Rule>, routes: &[Vec<String>]) -> Result<Self, String> {
        let stale = remove_stale();
        if stale > 0 {
            tracing::warn!(
                rules = stale,
                "removed egress steering rules an earlier agent left behind (it did not exit cleanly)"
            );
        }
        let mut installed = Self { rules: Vec::new() };
        if rules.is_empty() {
            return Ok(installed);
        }
        for route in routes {
            ip(route)?;
        }
        installed.update(rules)?;
        tracing::info!(
            rules = installed.rules.len(),
            "egress SNAT steering installed"
        );
        Ok(installed)
    }

    /// The rules in force.
    #[must_use]
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Changes the rules in force to `rules` (after a reload changed the VIPs): adds the new
    /// ones (in order), then deletes those no longer wanted.
    ///
    /// # Errors
    ///
    /// The first `ip` command that failed; the rules in force are then those that were added
    /// and not yet deleted.
    pub fn update(&mut self, rules: Vec<Rule>) -> Result<(), String> {
        for rule in &rules {
            if !self.rules.contains(rule) {
                ip(&rule.args("add"))?;
                self.rules.push(rule.clone());
            }
        }
        let mut result = Ok(());
        let old = std::mem::take(&mut self.rules);
        for rule in old.into_iter().rev() {
            if rules.contains(&rule) {
                self.rules.push(rule);
            } else if let Err(e) = ip(&rule.args("del")) {
                result = Err(e);
                self.rules.push(rule);
            }
        }
        self.rules.reverse();
        result
    }
}

impl Drop for EgressRoutes {
    fn drop(&mut self) {
        // Steering rules first (they come last in the list).
        for rule in self.rules.iter().rev() {
            let _ = ip(&rule.args("del"));
        }
    }
}

/// Whether a packet the kernel routed into the TUN is egress traffic to translate: not the
/// TUN's own chatter (IPv6 router and multicast-listener messages from its link-local or
/// unspecified address, anything to a multicast or broadcast address).
#[must_use]
pub fn is_egress(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let (Some(src), Some(dst)) = (packet.get(12..16), packet.get(16..20)) else {
                return false;
            };
            let src = std::net::Ipv4Addr::new(src[0], src[1], src[2], src[3]);
            let dst = std::net::Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]);
            !(src.is_unspecified()
                || src.is_link_local()
                || dst.is_multicast()
                || dst.is_broadcast())
        }
        Some(6) => {
            let (Some(src), Some(dst)) = (packet.get(8..24), packet.get(24..40)) else {
                return false;
            };
            let src = <[u8; 16]>::try_from(src).map(std::net::Ipv6Addr::from);
            let dst = <[u8; 16]>::try_from(dst).map(std::net::Ipv6Addr::from);
            let (Ok(src), Ok(dst)) = (src, dst) else {
                return false;
            };
            !(src.is_unspecified() || src.is_unicast_link_local() || dst.is_multicast())
        }
        _ => false,
    }
}

/// The transport flow of a packet from the TUN (TCP or UDP, unfragmented), if it has one.
#[must_use]
pub fn flow_of(packet: &[u8]) -> Option<FlowKey> {
    match packet::parse(packet, Link::Ip).ok()?.kind {
        Kind::Transport { flow, .. } => Some(flow),
        _ => None,
    }
}

/// Most bytes of an IPv4 ICMP error (RFC 1812 §4.3.2.3: no more than 576).
const ICMP4_MAX: usize = 576;
/// Most bytes of an ICMPv6 error (RFC 4443 §2.4: no more than the minimum MTU, 1280).
const ICMP6_MAX: usize = 1280;

/// Writes into `out` the ICMP error that refuses `packet` (an outbound IPv4 or IPv6 packet of
/// this host): "destination unreachable, communication administratively prohibited" (ICMP type
/// 3 code 13; ICMPv6 type 1 code 1), from the packet's destination to its source, quoting as
/// much of it as the error may carry. Returns its length, or `None` if `packet` has no whole IP
/// header or `out` is too small.
#[must_use]
pub fn refusal(packet: &[u8], out: &mut [u8]) -> Option<usize> {
    match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet.first()? & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
            let quoted = packet.len().min(total.max(ihl)).min(ICMP4_MAX - 28);
            let len = 28 + quoted;
            let out = out.get_mut(..len)?;
            out.fill(0);
            out[0] = 0x45;
            out[2..4].copy_from_slice(&u16::try_from(len).ok()?.to_be_bytes());
            out[8] = 64;
            out[9] = 1;
            out[12..16].copy_from_slice(packet.get(16..20)?);
            out[16..20].copy_from_slice(packet.get(12..16)?);
            let sum = !fold(sum16(&out[..20]));
            out[10..12].copy_from_slice(&sum.to_be_bytes());
            out[20] = 3;
            out[21] = 13;
            out[28..].copy_from_slice(&packet[..quoted]);
            let sum = !fold(sum16(&out[20..]));
            out[22..24].copy_from_slice(&sum.to_be_bytes());
            Some(len)
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let quoted = packet.len().min(ICMP6_MAX - 48);
            let len = 48 + quoted;
            let out = out.get_mut(..len)?;
            out.fill(0);
            out[0] = 0x60;
            let payload = u16::try_from(len - 40).ok()?;
            out[4..6].copy_from_slice(&payload.to_be_bytes());
            out[6] = 58;
            out[7] = 64;
            out[8..24].copy_from_slice(&packet[24..40]);
            out[24..40].copy_from_slice(&packet[8..24]);
            out[40] = 1;
            out[41] = 1;
            out[48..].copy_from_slice(&packet[..quoted]);
            // The checksum covers a pseudo-header: addresses, length, next header.
            let pseudo = sum16(&out[8..40]) + u64::from(payload) + 58;
            let sum = !fold(pseudo + sum16(&out[40..]));
            out[42..44].copy_from_slice(&sum.to_be_bytes());
            Some(len)
        }
        _ => None,
    }
}

/// The one's complement sum of `bytes` as 16-bit big-endian words, not yet folded.
fn sum16(bytes: &[u8]) -> u64 {
    bytes
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum()
}

/// Folds a sum into 16 bits.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// How long a refused flow counts as the same connection attempt.
pub const REFUSED_TTL_NS: u64 = 10_000_000_000;
/// Most refused flows remembered.
const REFUSED_CAPACITY: usize = 4096;

/// The flows refused lately, so that a connection is counted once however many of its packets
/// are refused (a UDP flow keeps sending; a lost ICMP error makes TCP send its SYN again).
#[derive(Debug, Default)]
pub struct RefusedFlows {
    seen: HashMap<FlowKey, u64>,
}

impl RefusedFlows {
    /// Records a refusal of `flow` at `now` (ns); true if the flow was not refused within the
    /// last [`REFUSED_TTL_NS`] (a new connection attempt to count). A packet without a flow
    /// counts every time.
    pub fn first(&mut self, flow: Option<FlowKey>, now: u64) -> bool {
        let Some(flow) = flow else {
            return true;
        };
        if let Some(&at) = self.seen.get(&flow)
            && now.saturating_sub(at) < REFUSED_TTL_NS
        {
            return false;
        }
        if self.seen.len() >= REFUSED_CAPACITY {
            self.seen
                .retain(|_, at| now.saturating_sub(*at) < REFUSED_TTL_NS);
            if self.seen.len() >= REFUSED_CAPACITY {
                self.seen.clear();
            }
        }
        self.seen.insert(flow, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder, SlicedPacket, TransportSlice};

    use super::*;

    fn args(rule: &Rule, verb: &str) -> String {
        rule.args(verb).join(" ")
    }

    #[test]
    fn ipv4_rules_match_the_host_address_and_ipv6_rules_every_local_socket_but_the_vips() {
        let egress: Vec<IpNet> = vec![
            "198.19.0.0/16".parse().unwrap(),
            "2001:2:0:ff::/64".parse().unwrap(),
        ];
        let addresses: Vec<IpAddr> = vec![
            "198.18.21.2".parse().unwrap(),
            "2001:2:0:21::2".parse().unwrap(),
        ];
        let vips: Vec<IpAddr> = vec![
            "198.18.100.1".parse().unwrap(),
            "2001:2:0:100::1".parse().unwrap(),
            "2001:2:0:100::1".parse().unwrap(),
        ];
        let r = rules(&egress, &addresses, &vips, (true, true));
        let shown: Vec<String> = r.iter().map(|r| args(r, "add")).collect();
        assert_eq!(
            shown,
            [
                "-6 rule add priority 4243 nop",
                "-6 rule add priority 4241 fwmark 0x4242 goto 4243",
                "-6 rule add priority 4241 from 2001:2:0:100::1/128 goto 4243",
                "-6 rule add priority 4242 to 2001:2:0:ff::/64 iif lo lookup 4242",
                "-4 rule add priority 4242 from 198.18.21.2/32 to 198.19.0.0/16 lookup 4242",
            ]
        );
        assert_eq!(
            routes(&r, &addresses, "lbtun0")
                .iter()
                .map(|a| a.join(" "))
                .collect::<Vec<_>>(),
            [
                "-4 route replace default dev lbtun0 table 4242 src 198.18.21.2",
                "-6 route replace default dev lbtun0 table 4242 src 2001:2:0:21::2",
            ]
        );
        // No IPv6 SNAT table: no IPv6 steering.
        let r = rules(&egress, &addresses, &vips, (true, false));
        assert!(r.iter().all(|r| !r.v6));
        assert_eq!(routes(&r, &addresses, "t").len(), 1);
        assert!(rules(&[], &addresses, &vips, (true, true)).is_empty());
    }

    #[test]
    fn the_tuns_own_chatter_is_not_egress() {
        let mut v6 = Vec::new();
        // A router solicitation from the TUN's link-local address.
        PacketBuilder::ipv6(
            "fe80::1".parse::<std::net::Ipv6Addr>().unwrap().octets(),
            "ff02::2".parse::<std::net::Ipv6Addr>().unwrap().octets(),
            255,
        )
        .icmpv6(Icmpv6Type::Unknown {
            type_u8: 133,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut v6, &[])
        .unwrap();
        assert!(!is_egress(&v6));
        let mut tcp = Vec::new();
        PacketBuilder::ipv6(
            "2001:2:0:21::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            "2001:2:0:ff::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            64,
        )
        .tcp(40_000, 7000, 1, 1000)
        .syn()
        .write(&mut tcp, &[])
        .unwrap();
        assert!(is_egress(&tcp));
        let mut v4 = Vec::new();
        PacketBuilder::ipv4([198, 18, 21, 2], [224, 0, 0, 22], 1)
            .udp(1, 2)
            .write(&mut v4, &[])
            .unwrap();
        assert!(!is_egress(&v4));
        v4[16..20].copy_from_slice(&[198, 19, 0, 2]);
        assert!(is_egress(&v4));
        assert!(!is_egress(&[]));
        assert!(!is_egress(&[0x45; 10]));
    }

    #[test]
    fn a_refusal_is_a_valid_icmp_error_quoting_the_packet() {
        let mut syn = Vec::new();
        PacketBuilder::ipv4([198, 18, 21, 2], [198, 19, 0, 2], 64)
            .tcp(40_000, 7000, 1, 1000)
            .syn()
            .write(&mut syn, &[])
            .unwrap();
        let mut out4 = [0u8; 2048];
        let n = refusal(&syn, &mut out4).unwrap();
        let p = SlicedPacket::from_ip(&out4[..n]).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = &p.net else {
            panic!("{p:?}")
        };
        assert_eq!(ip.header().source(), [198, 19, 0, 2]);
        assert_eq!(ip.header().destination(), [198, 18, 21, 2]);
        assert_eq!(
            ip.header().to_header().calc_header_checksum(),
            ip.header().header_checksum()
        );
        let Some(TransportSlice::Icmpv4(icmp)) = &p.transport else {
            panic!("{p:?}")
        };
        assert!(matches!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FilterProhibited
            )
        ));
        assert_eq!(icmp.payload(), &syn[..]);
        assert_eq!(
            icmp.header().icmp_type.calc_checksum(icmp.payload()),
            icmp.checksum()
        );

        let mut syn6 = Vec::new();
        let (src, dst) = (
            "2001:2:0:21::2".parse::<std::net::Ipv6Addr>().unwrap(),
            "2001:2:0:ff::2".parse::<std::net::Ipv6Addr>().unwrap(),
        );
        PacketBuilder::ipv6(src.octets(), dst.octets(), 64)
            .udp(40_000, 53)
            .write(&mut syn6, &[7; 2000])
            .unwrap();
        let mut out = [0u8; 2048];
        let n = refusal(&syn6, &mut out).unwrap();
        assert_eq!(n, 1280, "cut to the minimum MTU");
        let p = SlicedPacket::from_ip(&out[..n]).unwrap();
        let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else {
            panic!("{p:?}")
        };
        assert_eq!(ip.header().source_addr(), dst);
        assert_eq!(ip.header().destination_addr(), src);
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
            panic!("{p:?}")
        };
        assert!(matches!(
            icmp.icmp_type(),
            Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Prohibited)
        ));
        assert_eq!(
            icmp.icmp_type()
                .calc_checksum(dst.octets(), src.octets(), icmp.payload())
                .unwrap(),
            icmp.checksum()
        );
        assert_eq!(icmp.payload(), &syn6[..1280 - 48]);
        let mut spare = [0u8; 2048];
        assert_eq!(refusal(&syn6[..39], &mut spare), None);
        assert_eq!(refusal(&syn6, &mut spare[..100]), None);
    }

    #[test]
    fn a_refused_flow_counts_once() {
        let flow = |port| {
            FlowKey::new(
                "198.18.21.2".parse().unwrap(),
                "198.19.0.2".parse().unwrap(),
                6,
                port,
                7000,
            )
        };
        let mut r = RefusedFlows::default();
        assert!(r.first(flow(1), 0));
        assert!(!r.first(flow(1), 1));
        assert!(r.first(flow(2), 2));
        assert!(r.first(flow(1), REFUSED_TTL_NS + 1));
        assert!(r.first(None, 0));
        assert!(r.first(None, 0));
        for p in 0..10_000 {
            r.first(flow(p), 5);
        }
        assert!(r.seen.len() <= REFUSED_CAPACITY);
    }
}
