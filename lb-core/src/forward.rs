//! The forwarding decision: [`process`] turns one received frame into an [`Action`]. It runs on
//! every packet of every mux worker, as pure code.
//!
//! 1. Parse ([`crate::packet`]). A malformed frame is dropped with the reason of its layer; so are
//!    an IP version that is not the EtherType's and bad IPv4 options, each with its own reason.
//! 2. Match a VIP ([`Snapshot::match_vip`]). A TCP or UDP packet to no VIP but to a port of a
//!    VIP address's egress SNAT space is return traffic: it goes to the backend owning that
//!    port's range ([`Snapshot::snat_owner`], [`Action::SnatReturn`]). Other traffic for no VIP
//!    is passed to the host or dropped, as `node.unmatched` says. (ICMP errors about SNAT
//!    connections are not steered: they are passed or dropped like other unmatched traffic.)
//!    Traffic to steer (to a VIP, or SNAT return traffic) from a martian source
//!    ([`FlowKey::martian_source`]: the VIP itself, 0/8, 127/8, multicast, broadcast; `::`,
//!    `::1`, ff00::/8) or with a TTL or hop limit of 0 is dropped ([`DropReason::MartianSource`],
//!    [`DropReason::TtlExpired`]); other traffic is the host's to judge.
//! 3. Choose the backend.
//!    - A TCP or UDP flow in the worker's [`ConnTable`] keeps its backend, while that backend is
//!      still in the VIP's table (a drained backend, weight 0, keeps its flows).
//!    - Otherwise the Maglev table decides, and the flow is tracked. A full table falls back to
//!      pure hashing; the packet is still forwarded.
//!    - Fragments use the 3-tuple and are not tracked.
//!    - ICMP errors use the quoted flow, reversed, so they reach the backend of the connection.
//!    - Daisy chaining: within a window after a GRE VIP's table changed
//!      ([`Snapshot::chain_from`]), a flow the table moved carries its previous backend's tag in
//!      the GRE key, and is not tracked, so all its packets keep naming that backend.
//! 4. Encapsulate towards the backend ([`crate::encap`]). If the result would exceed the MTU and
//!    the packet may not be fragmented, answer the client with a rate-limited ICMP "fragmentation
//!    needed" or ICMPv6 "packet too big", with the MTU reduced by the encapsulation overhead.
//!
//! **Invariants.** Nothing here allocates. Every drop has a [`DropReason`] and a counter.
//! [`DropReason::Internal`] must stay 0: it counts states that correct code cannot reach.

use std::io::Cursor;
use std::net::IpAddr;

use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder, icmpv4::DestUnreachableHeader};

use crate::config::Unmatched;
use crate::conntrack::{ConnTable, Tracked};
use crate::encap::{self, EncapKind, EncapParams};
use crate::flow::FlowKey;
use crate::packet::{self, Kind, Layer, Link, ParseError, Parsed};
use crate::snapshot::{Snapshot, Vip};

/// Why a packet was dropped. Each has a counter; [`DropReason::Internal`] must stay 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The frame ended before a header did.
    Truncated,
    /// A header had impossible contents.
    Malformed,
    /// An ICMP error quoted too little of the packet to know its flow.
    BadIcmpQuote,
    /// No VIP matched, and `node.unmatched = "drop"`.
    NoVip,
    /// A fragment to an address with several port VIPs of its protocol: its VIP is ambiguous.
    FragmentVipAmbiguous,
    /// The VIP has no backend with a weight above 0.
    NoBackend,
    /// The node has no source address of the backend's family.
    NoSourceAddress,
    /// The encapsulated packet would exceed the MTU, and the inner packet may be fragmented
    /// (IPv4 without DF): the outer header sets DF, so it cannot leave. Counted, not answered.
    TooBigFragmentable,
    /// Too big with DF, but the ICMP answer was rate-limited.
    TooBigRateLimited,
    /// The received IPv4 header's checksum is wrong (a corrupted packet).
    BadChecksum,
    /// An IP header of the other version than the frame's EtherType (IPv4 in an IPv6 frame, or
    /// the reverse).
    VersionMismatch,
    /// An IPv4 option of length below 2 or running past the header.
    BadIpOptions,
    /// A packet for a VIP (or SNAT return traffic) from a source no packet from outside may
    /// carry: the destination itself, 0.0.0.0/8, 127.0.0.0/8, multicast, 255.255.255.255;
    /// `::`, `::1`, ff00::/8 ([`FlowKey::martian_source`]).
    MartianSource,
    /// A packet for a VIP (or SNAT return traffic) with a TTL or hop limit of 0, which no router
    /// sends.
    TtlExpired,
    /// A state correct code cannot reach (a table or buffer inconsistency). Must stay 0.
    Internal,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [Self; 15] = [
        Self::Truncated,
        Self::Malformed,
        Self::BadIcmpQuote,
        Self::NoVip,
        Self::FragmentVipAmbiguous,
        Self::NoBackend,
        Self::NoSourceAddress,
        Self::TooBigFragmentable,
        Self::TooBigRateLimited,
        Self::BadChecksum,
        Self::VersionMismatch,
        Self::BadIpOptions,
        Self::MartianSource,
        Self::TtlExpired,
        Self::Internal,
    ];

    /// The counter's name, as in metrics (`lb_drops_total{reason="…"}`).
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Malformed => "malformed",
            Self::BadIcmpQuote => "bad_icmp_quote",
            Self::NoVip => "no_vip",
            Self::FragmentVipAmbiguous => "fragment_vip_ambiguous",
            Self::NoBackend => "no_backend",
            Self::NoSourceAddress => "no_source_address",
            Self::TooBigFragmentable => "too_big_fragmentable",
            Self::TooBigRateLimited => "too_big_rate_limited",
            Self::BadChecksum => "bad_checksum",
            Self::VersionMismatch => "version_mismatch",
            Self::BadIpOptions => "bad_ip_options",
            Self::MartianSource => "martian_source",
            Self::TtlExpired => "ttl_expired",
            Self::Internal => "internal",
        }
    }

    /// The counter index: the declaration order, which [`Self::ALL`] follows
    /// (`tests::drop_reasons_are_indexed_in_order`). No search per drop.
    fn index(self) -> usize {
        self as usize
    }

    fn of_parse_error(e: ParseError) -> Self {
        match e {
            ParseError::Truncated {
                layer: Layer::IcmpQuote,
                ..
            }
            | ParseError::Malformed {
                layer: Layer::IcmpQuote,
            } => Self::BadIcmpQuote,
            ParseError::Truncated { .. } => Self::Truncated,
            ParseError::Malformed { .. } => Self::Malformed,
            ParseError::BadChecksum { .. } => Self::BadChecksum,
            ParseError::VersionMismatch { .. } => Self::VersionMismatch,
            ParseError::BadIpOptions => Self::BadIpOptions,
        }
    }
}

/// What to do with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the first `len` bytes of the output buffer (an encapsulated packet) to `backend`.
    Encap {
        /// The VIP's index in the snapshot.
        vip: u16,
        /// The backend's index in the VIP's table.
        backend: u16,
        /// The backend's address: the outer destination.
        to: IpAddr,
        /// Length of the encapsulated packet in the output buffer.
        len: usize,
    },
    /// Send the first `len` bytes of the output buffer (an encapsulated packet) to `to`, the
    /// backend owning the SNAT port this return traffic is addressed to.
    SnatReturn {
        /// The owning backend: the outer destination.
        to: IpAddr,
        /// Length of the encapsulated packet in the output buffer.
        len: usize,
    },
    /// Send the first `len` bytes of the output buffer (an ICMP error, an IP packet) back to
    /// the client.
    IcmpReply {
        /// Length of the ICMP packet in the output buffer.
        len: usize,
    },
    /// Hand the frame to the host's own stack.
    Pass,
    /// Drop the frame.
    Drop(DropReason),
}

impl Action {
    /// How many bytes of the output buffer it sends: 0 for [`Action::Pass`] and
    /// [`Action::Drop`].
    #[must_use]
    pub fn output_len(self) -> usize {
        match self {
            Self::Encap { len, .. } | Self::SnatReturn { len, .. } | Self::IcmpReply { len } => len,
            Self::Pass | Self::Drop(_) => 0,
        }
    }
}

/// A worker's counters. Each worker owns one; they are summed when scraped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames processed.
    pub packets: u64,
    /// Packets encapsulated towards a backend.
    pub encapsulated: u64,
    /// Frames passed to the host.
    pub passed: u64,
    /// Of the encapsulated packets, SNAT return traffic sent to the owner of its port.
    pub snat_returned: u64,
    /// ICMP "too big" answers sent.
    pub icmp_too_big_sent: u64,
    /// Drops, indexed as [`DropReason::ALL`].
    pub drops: [u64; DropReason::ALL.len()],
}

impl Counters {
    /// Counts one processed frame and its outcome.
    #[inline]
    fn count(&mut self, action: Action) {
        self.packets += 1;
        match action {
            Action::Encap { .. } => self.encapsulated += 1,
            Action::SnatReturn { .. } => {
                self.encapsulated += 1;
                self.snat_returned += 1;
            }
            Action::IcmpReply { .. } => self.icmp_too_big_sent += 1,
            Action::Pass => self.passed += 1,
            Action::Drop(reason) => self.drops[reason.index()] += 1,
        }
    }

    /// The drops of one reason.
    #[must_use]
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }
}

/// A token bucket for ICMP answers, so that a flood of big packets cannot make the mux flood
/// clients with ICMP (RFC 1812 §4.3.2.8, RFC 4443 §2.4(f)).
#[derive(Clone, Copy, Debug)]
pub struct RateLimiter {
    tokens: u64,
    burst: u64,
    interval_ns: u64,
    last_refill: u64,
}

impl RateLimiter {
    /// `per_second` answers on average, up to `burst` at once.
    #[must_use]
    pub fn new(per_second: u64, burst: u64) -> Self {
        Self {
            tokens: burst,
            burst,
            interval_ns: 1_000_000_000 / per_second.max(1),
            last_refill: 0,
        }
    }

    /// Takes a token at time `now` (nanoseconds), if there is one.
    pub fn take(&mut self, now: u64) -> bool {
        let earned = now.saturating_sub(self.last_refill) / self.interval_ns;
        if earned > 0 {
            self.tokens = (self.tokens + earned).min(self.burst);
            self.last_refill += earned * self.interval_ns;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Everything a worker owns: its connection table, its counters, its ICMP rate limit.
#[derive(Debug)]
pub struct WorkerState {
    /// The worker's connection table.
    pub conntrack: ConnTable,
    /// The worker's counters.
    pub counters: Counters,
    /// The ICMP "too big" rate limit.
    pub too_big_limiter: RateLimiter,
}

impl WorkerState {
    /// A worker with `conntrack` and at most 100 ICMP answers a second (bursts of 10).
    #[must_use]
    pub fn new(conntrack: ConnTable) -> Self {
        Self {
            conntrack,
            counters: Counters::default(),
            too_big_limiter: RateLimiter::new(100, 10),
        }
    }
}

/// Decides what to do with `frame`, writing any packet to send into `out` (which must hold
/// 65 535 bytes plus the largest encapsulation overhead, 48 bytes). `now` is a monotonic clock
/// in nanoseconds. See the module docs for the steps.
pub fn process(
    frame: &[u8],
    link: Link,
    snapshot: &Snapshot,
    state: &mut WorkerState,
    now: u64,
    out: &mut [u8],
) -> Action {
    let action = decide(frame, link, None, snapshot, state, now, out);
    state.counters.count(action);
    action
}

/// Frames per round of [`process_batch`]: their connection-table reads overlap. Small enough
/// that what a round reads stays in the first-level cache until its frames are decided.
pub const BATCH_ROUND: usize = 16;

/// [`process`] for a batch of frames: `actions[i]` and `outs[i]` are what
/// `process(frames[i], …, outs[i])` would give, in order, with the same effects on `state`
/// (`tests::batch_equals_one_by_one`). Handles the first `n` frames, `n` being the shortest of
/// the three slices, and returns `n`.
///
/// The gain is with many flows, when the connection table does not fit in the caches: per round
/// of [`BATCH_ROUND`] frames it parses the fast-path frames and hashes their flows first, reads
/// their buckets ([`ConnTable::touch`]) so that the cache misses overlap, then decides each frame
/// with its hash already computed. Nothing allocates.
pub fn process_batch(
    frames: &[&[u8]],
    link: Link,
    snapshot: &Snapshot,
    state: &mut WorkerState,
    now: u64,
    outs: &mut [&mut [u8]],
    actions: &mut [Action],
) -> usize {
    let n = frames.len().min(outs.len()).min(actions.len());
    let mut hints = [None::<u64>; BATCH_ROUND];
    let mut hashes = [0u64; BATCH_ROUND];
    for ((frames, outs), actions) in frames[..n]
        .chunks(BATCH_ROUND)
        .zip(outs[..n].chunks_mut(BATCH_ROUND))
        .zip(actions[..n].chunks_mut(BATCH_ROUND))
    {
        let mut known = 0;
        for (frame, hint) in frames.iter().zip(&mut hints) {
            *hint = packet::parse_fast(frame, link).and_then(|p| match p.kind {
                Kind::Transport { flow, .. } => Some(flow.hash()),
                _ => None,
            });
            if let Some(hash) = *hint {
                hashes[known] = hash;
                known += 1;
            }
        }
        std::hint::black_box(state.conntrack.touch(&hashes[..known]));
        for (((frame, out), action), &hint) in frames.iter().zip(outs).zip(actions).zip(&hints) {
            *action = decide(frame, link, hint, snapshot, state, now, out);
            state.counters.count(*action);
        }
    }
    n
}

/// Parses `frame` ([`packet::parse`], its two paths called apart) and decides. `hash` is the
/// flow hash of a frame the fast path takes, if the caller has computed it already.
#[inline(always)]
fn decide(
    frame: &[u8],
    link: Link,
    hash: Option<u64>,
    snapshot: &Snapshot,
    state: &mut WorkerState,
    now: u64,
    out: &mut [u8],
) -> Action {
    // Two copies of `decide_parsed`: in the fast path's, the kind is known to be `Transport`,
    // so the compiler drops the other arms and keeps the flow in registers instead of copying
    // `Parsed` about (measured: about 150 instructions a packet less).
    if let Some(parsed) = packet::parse_fast(frame, link) {
        return decide_parsed(parsed, hash, snapshot, state, now, out);
    }
    match packet::parse_general(frame, link) {
        Ok(parsed) => decide_parsed(parsed, None, snapshot, state, now, out),
        Err(e) => Action::Drop(DropReason::of_parse_error(e)),
    }
}

/// The decision for a parsed frame: steps 2 to 4 of the module docs. `hash`, if given, is the
/// hash of the frame's own flow (a `Transport` frame's).
#[inline(always)]
fn decide_parsed(
    parsed: Parsed<'_>,
    hash: Option<u64>,
    snapshot: &Snapshot,
    state: &mut WorkerState,
    now: u64,
    out: &mut [u8],
) -> Action {
    let unmatched = || match snapshot.node.unmatched {
        Unmatched::Pass => Action::Pass,
        Unmatched::Drop => Action::Drop(DropReason::NoVip),
    };
    // The flow to steer by, its VIP, and whether it is tracked.
    let (flow, vip_index, tracked) = match parsed.kind {
        Kind::NotIp { .. } => return Action::Pass,
        Kind::OtherIp { .. } => return unmatched(),
        Kind::Transport { flow, .. } => {
            match snapshot.match_vip(flow.dst(), flow.protocol(), flow.dst_port()) {
                Some(v) => (flow, v, true),
                None => {
                    return match snapshot.snat_owner(flow.dst(), flow.dst_port()) {
                        Some((to, tunnel)) => match unfit(&parsed) {
                            Some(reason) => Action::Drop(reason),
                            None => snat_return(&parsed, snapshot, to, tunnel, state, now, out),
                        },
                        None => unmatched(),
                    };
                }
            }
        }
        Kind::IcmpError { quoted, .. } => {
            let client_flow = quoted.reversed();
            match snapshot.match_vip(
                client_flow.dst(),
                client_flow.protocol(),
                client_flow.dst_port(),
            ) {
                Some(v) => (client_flow, v, true),
                None => return unmatched(),
            }
        }
        Kind::Fragment { flow } => {
            match snapshot.match_vip_of_fragment(flow.dst(), flow.protocol()) {
                Some(v) => (flow, v, false),
                // No clear VIP, yet VIPs on this address and protocol: several port VIPs.
                None if snapshot
                    .vips
                    .iter()
                    .any(|v| v.address == flow.dst() && v.protocol == flow.protocol()) =>
                {
                    return Action::Drop(DropReason::FragmentVipAmbiguous);
                }
                None => return unmatched(),
            }
        }
    };
    if let Some(reason) = unfit(&parsed) {
        return Action::Drop(reason);
    }
    let Some(vip) = snapshot.vip(vip_index) else {
        return Action::Drop(DropReason::Internal);
    };
    // Only a fast-path frame comes with its hash: a `Transport` one, steered by its own flow.
    let hash = hash.unwrap_or_else(|| flow.hash());
    debug_assert_eq!(hash, flow.hash());
    let is_icmp_error = matches!(parsed.kind, Kind::IcmpError { .. });
    let Some((backend, chain_key)) = choose_backend(
        snapshot,
        vip,
        vip_index,
        &flow,
        hash,
        tracked,
        is_icmp_error,
        state,
        now,
    ) else {
        return Action::Drop(DropReason::NoBackend);
    };
    let Some(to) = vip.backend(backend).map(|b| b.id.0) else {
        return Action::Drop(DropReason::Internal);
    };
    // Built with the snapshot: the node's source address of the backend's family, its TTL,
    // the VIP's encapsulation. None for an index in range means no such source address.
    let Some(tunnel) = vip.tunnel(backend) else {
        return Action::Drop(DropReason::NoSourceAddress);
    };
    if let Some(key) = chain_key {
        // Daisy chaining, within the window after a change: the GRE key names the previous
        // backend. Rare (moved slots only), so the generic encapsulation is fine here.
        let params = EncapParams {
            kind: EncapKind::Gre { key: Some(key) },
            ..*tunnel.params()
        };
        let overhead = encap::overhead(params.kind, params.outer_dst.is_ipv6());
        if parsed.ip.len() + overhead > usize::from(snapshot.node.mtu) {
            return too_big(&parsed, snapshot, overhead, state, now, out);
        }
        return match encap::encapsulate(parsed.ip, &params, out) {
            Ok(len) => Action::Encap {
                vip: vip_index,
                backend,
                to,
                len,
            },
            Err(_) => Action::Drop(DropReason::Internal),
        };
    }
    let overhead = tunnel.overhead();
    if parsed.ip.len() + overhead > usize::from(snapshot.node.mtu) {
        return too_big(&parsed, snapshot, overhead, state, now, out);
    }
    match tunnel.encapsulate(parsed.ip, out) {
        Ok(len) => Action::Encap {
            vip: vip_index,
            backend,
            to,
            len,
        },
        Err(_) => Action::Drop(DropReason::Internal),
    }
}

/// Why a packet to steer may not be forwarded at all, whatever its VIP: a martian source (of
/// the packet itself, not of a flow an ICMP error quotes), or a TTL or hop limit of 0.
#[inline(always)]
fn unfit(parsed: &Parsed<'_>) -> Option<DropReason> {
    let martian = match &parsed.kind {
        Kind::Transport { flow, .. }
        | Kind::Fragment { flow }
        | Kind::IcmpError { flow, .. }
        | Kind::OtherIp { flow } => flow.martian_source(),
        Kind::NotIp { .. } => false,
    };
    if martian {
        Some(DropReason::MartianSource)
    } else if parsed.ttl == 0 {
        Some(DropReason::TtlExpired)
    } else {
        None
    }
}

/// Return traffic of an egress SNAT connection (to a VIP address and a port of its SNAT space):
/// encapsulated to the backend that owns the port's range. No connection tracking: the range
/// map is exact and the same on every mux.
fn snat_return(
    parsed: &Parsed<'_>,
    snapshot: &Snapshot,
    to: IpAddr,
    tunnel: &encap::Tunnel,
    state: &mut WorkerState,
    now: u64,
    out: &mut [u8],
) -> Action {
    let overhead = tunnel.overhead();
    if parsed.ip.len() + overhead > usize::from(snapshot.node.mtu) {
        return too_big(parsed, snapshot, overhead, state, now, out);
    }
    match tunnel.encapsulate(parsed.ip, out) {
        Ok(len) => Action::SnatReturn { to, len },
        Err(_) => Action::Drop(DropReason::Internal),
    }
}

/// The backend of a flow: its tracked backend while that is still in the table, else the
/// Maglev table's (tracking the new choice). ICMP errors only read the connection table.
///
/// Within a daisy-chaining window ([`Snapshot::chain_from`]), a flow the table moved gets the
/// previous backend's tag as well, and is not tracked: its packets keep naming the previous
/// backend (which may hold the connection) until the window closes.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the values are the decision's state"
)]
fn choose_backend(
    snapshot: &Snapshot,
    vip: &Vip,
    vip_index: u16,
    flow: &FlowKey,
    hash: u64,
    tracked: bool,
    is_icmp_error: bool,
    state: &mut WorkerState,
    now: u64,
) -> Option<(u16, Option<u32>)> {
    // A drained backend (weight 0) stays in the table's list, so its tracked flows continue.
    if tracked
        && let Some(t) = state.conntrack.lookup(flow, hash, now)
        && t.vip == vip_index
        && vip.still_serves(t.backend, t.backend_tag)
    {
        return Some((t.backend, None));
    }
    let backend = vip.table.lookup(hash)?;
    if let Some(address) = vip.backend(backend).map(|b| b.id.0)
        && let Some(key) = snapshot.previous_backend_tag(vip_index, hash, address, now)
    {
        return Some((backend, Some(key)));
    }
    if tracked && !is_icmp_error {
        let tag = vip.backend_tag(backend).unwrap_or(0);
        // A full table (InsertOutcome::Full, counted by the table) is not a drop: the flow is
        // then steered by the Maglev table alone (Maglev §3.3).
        let _ = state.conntrack.insert(
            *flow,
            hash,
            Tracked {
                vip: vip_index,
                backend,
                backend_tag: tag,
            },
            now,
        );
    }
    Some((backend, None))
}

/// Answers a packet too big to encapsulate: ICMP "fragmentation needed" (IPv4 with DF) or
/// ICMPv6 "packet too big", from the VIP to the client, with the MTU the client must use so
/// that its packets fit once encapsulated. Rate-limited.
fn too_big(
    parsed: &Parsed<'_>,
    snapshot: &Snapshot,
    overhead: usize,
    state: &mut WorkerState,
    now: u64,
    out: &mut [u8],
) -> Action {
    if !parsed.dont_fragment {
        return Action::Drop(DropReason::TooBigFragmentable);
    }
    if !state.too_big_limiter.take(now) {
        return Action::Drop(DropReason::TooBigRateLimited);
    }
    let Some(flow) = parsed.kind.flow() else {
        return Action::Drop(DropReason::Internal);
    };
    let mtu = usize::from(snapshot.node.mtu).saturating_sub(overhead);
    let (client, vip) = (flow.src(), flow.dst());
    let mut cursor = Cursor::new(&mut *out);
    let written = match (vip, client) {
        (IpAddr::V4(vip), IpAddr::V4(client)) => {
            // RFC 1812 §4.3.2.3: quote as much as fits in 576 bytes.
            let quote = &parsed.ip[..parsed.ip.len().min(576 - 28)];
            let next_hop_mtu = u16::try_from(mtu.max(68)).unwrap_or(u16::MAX);
            PacketBuilder::ipv4(vip.octets(), client.octets(), 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    DestUnreachableHeader::FragmentationNeeded { next_hop_mtu },
                ))
                .write(&mut cursor, quote)
        }
        (IpAddr::V6(vip), IpAddr::V6(client)) => {
            // RFC 4443 §3.2: the MTU is at least 1280; quote as much as fits in 1280 bytes.
            let quote = &parsed.ip[..parsed.ip.len().min(1280 - 48)];
            let mtu = u32::try_from(mtu.max(1280)).unwrap_or(u32::MAX);
            PacketBuilder::ipv6(vip.octets(), client.octets(), 64)
                .icmpv6(Icmpv6Type::PacketTooBig { mtu })
                .write(&mut cursor, quote)
        }
        _ => return Action::Drop(DropReason::Internal),
    };
    match written {
        Ok(()) => Action::IcmpReply {
            len: usize::try_from(cursor.position()).unwrap_or(0),
        },
        Err(_) => Action::Drop(DropReason::Internal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Encap};
    use crate::conntrack::ConnTableConfig;
    use crate::flow::PROTO_TCP;
    use crate::golden::{
        self, CLIENT, CLIENT6, CONFIG, POOL, VIP, VIP6, tcp4, tcp6, udp4, udp6, with_df,
        with_flags, worker,
    };
    use etherparse::{Icmpv4Slice, Icmpv6Slice, IpNumber, Ipv4HeaderSlice, Ipv6HeaderSlice};
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::compile(&Config::from_toml(text, "test.toml").unwrap(), 1).unwrap()
    }

    fn run(
        snapshot: &Snapshot,
        state: &mut WorkerState,
        frame: &[u8],
        now: u64,
    ) -> (Action, Vec<u8>) {
        let mut out = vec![0u8; 65535 + 48];
        let action = process(frame, Link::Ip, snapshot, state, now, &mut out);
        let len = action.output_len();
        out.truncate(len);
        (action, out)
    }

    /// Checks an encapsulated packet with etherparse: outer addresses, protocol, TTL, DF and
    /// checksum, and that the inner packet is the input, untouched.
    fn check_encapsulated(out: &[u8], inner: &[u8], from: IpAddr, to: IpAddr, gre: bool) {
        let (payload_at, protocol) = match to {
            IpAddr::V4(to4) => {
                let h = Ipv4HeaderSlice::from_slice(out).unwrap();
                assert_eq!(
                    (IpAddr::V4(h.source_addr()), h.destination_addr()),
                    (from, to4)
                );
                assert!(h.dont_fragment());
                assert_eq!(h.ttl(), 63);
                assert_eq!(usize::from(h.total_len()), out.len());
                assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
                (usize::from(h.ihl()) * 4, h.protocol())
            }
            IpAddr::V6(to6) => {
                let h = Ipv6HeaderSlice::from_slice(out).unwrap();
                assert_eq!(
                    (IpAddr::V6(h.source_addr()), h.destination_addr()),
                    (from, to6)
                );
                assert_eq!(h.hop_limit(), 63);
                assert_eq!(usize::from(h.payload_length()) + 40, out.len());
                (40, h.next_header())
            }
        };
        let inner_at = if gre {
            assert_eq!(protocol, IpNumber::GRE);
            payload_at + 4
        } else {
            assert_eq!(
                protocol,
                if inner[0] >> 4 == 4 {
                    IpNumber::IPV4
                } else {
                    IpNumber::IPV6
                }
            );
            payload_at
        };
        assert_eq!(&out[inner_at..], inner, "the inner packet is untouched");
    }

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(a))
    }

    #[test]
    fn snat_return_traffic_goes_to_the_owner_of_its_port_range() {
        let text = format!(
            "{CONFIG}\n[[snat]]\naddress = \"198.18.100.2\"\nfirst_port = 1024\nlast_port = 65535\n"
        );
        let config = Config::from_toml(&text, "t").unwrap();
        let s = Snapshot::compile(&config, 1).unwrap();
        let ranges = crate::snat::PortRanges::build(
            &config.snats[0],
            &config.snat_backends(IpAddr::V4(POOL.into())),
        );
        let mut state = worker();
        for port in [1024u16, 5000, 40_000, 65_535] {
            let reply = tcp4([198, 19, 0, 2], POOL, 443, port, false, 20);
            let (action, out) = run(&s, &mut state, &reply, 10);
            let owner = ranges.owner(port).unwrap();
            assert_eq!(
                action,
                Action::SnatReturn {
                    to: owner,
                    len: out.len()
                }
            );
            check_encapsulated(&out, &reply, v4([198, 18, 11, 2]), owner, false);
        }
        // The service port is the VIP's; a port below the SNAT space is no one's.
        let (action, _) = run(&s, &mut state, &tcp4(CLIENT, POOL, 1000, 80, true, 0), 10);
        assert!(matches!(action, Action::Encap { .. }), "{action:?}");
        let (action, _) = run(&s, &mut state, &tcp4(CLIENT, POOL, 1000, 1000, true, 0), 10);
        assert_eq!(action, Action::Pass);
        // Health overrides do not move ranges: the split follows the file.
        let mut effective = config.clone();
        effective.vips[6].backends.remove(0);
        let mut s2 = Snapshot::compile(&effective, 2).unwrap();
        s2.use_snat_of(&config);
        let owned_by_removed = (1024..=65_535u16)
            .find(|&p| ranges.owner(p) == Some(effective_removed(&config)))
            .unwrap();
        assert_eq!(
            s2.snat_owner(IpAddr::V4(POOL.into()), owned_by_removed)
                .map(|o| o.0),
            ranges.owner(owned_by_removed)
        );
    }

    fn effective_removed(config: &Config) -> IpAddr {
        config.vips[6].backends[0].address
    }

    #[test]
    fn moved_flows_name_their_previous_backend_in_the_gre_key_within_the_window() {
        let gre_pool = |backends: &[&str]| {
            let mut t = String::from(
                "[node]\naddress_v4 = \"198.18.11.2\"\n[[vip]]\nname = \"pool\"\naddress = \"198.18.100.2\"\nprotocol = \"tcp\"\nport = 80\nencap = \"gre\"\n",
            );
            for b in backends {
                t.push_str(&format!("[[vip.backend]]\naddress = \"{b}\"\n"));
            }
            t
        };
        let old = snapshot(&gre_pool(&["198.18.21.2", "198.18.22.2"]));
        let mut new = snapshot(&gre_pool(&["198.18.21.2", "198.18.22.2", "198.18.23.2"]));
        let until = 1_000_000_000;
        new.chain_from(&old, until);
        let mut state = worker();
        let (mut moved, mut stayed) = (0, 0);
        for sport in 1000..1300u16 {
            let frame = tcp4(CLIENT, POOL, sport, 80, false, 10);
            let flow = FlowKey::v4(CLIENT.into(), POOL.into(), PROTO_TCP, sport, 80);
            let before = old.vips[0].table.lookup_backend(flow.hash()).unwrap().id.0;
            let now_backend = new.vips[0].table.lookup_backend(flow.hash()).unwrap().id.0;
            let (action, out) = run(&new, &mut state, &frame, 10);
            let Action::Encap { to, .. } = action else {
                panic!("{action:?}")
            };
            assert_eq!(to, now_backend);
            let tunnel = encap::decapsulate(&out).unwrap();
            assert_eq!(tunnel.inner, &frame[..]);
            if before == now_backend {
                stayed += 1;
                assert_eq!(tunnel.gre_key, None, "an unmoved flow carries no key");
            } else {
                moved += 1;
                assert_eq!(tunnel.gre_key, Some(crate::snapshot::backend_tag(before)));
                // Not tracked: the next packet names the previous backend again.
                let (_, again) = run(&new, &mut state, &frame, 20);
                assert_eq!(encap::decapsulate(&again).unwrap().gre_key, tunnel.gre_key);
                // After the window: no key, and the flow is tracked to its new backend.
                let (_, late) = run(&new, &mut state, &frame, until + 1);
                assert_eq!(encap::decapsulate(&late).unwrap().gre_key, None);
            }
        }
        assert!(moved > 50 && stayed > 100, "moved {moved}, stayed {stayed}");
        // A later publish that leaves this VIP's table alone (say, another VIP changed) keeps
        // the open window, with its deadline.
        let mut later = snapshot(&gre_pool(&["198.18.21.2", "198.18.22.2", "198.18.23.2"]));
        later.chain_from(&new, until + 5);
        let moved_flow = (1000..1300u16)
            .map(|sport| FlowKey::v4(CLIENT.into(), POOL.into(), PROTO_TCP, sport, 80))
            .find(|f| {
                old.vips[0].table.lookup_backend(f.hash()).unwrap().id
                    != new.vips[0].table.lookup_backend(f.hash()).unwrap().id
            })
            .unwrap();
        let address = later.vips[0]
            .table
            .lookup_backend(moved_flow.hash())
            .unwrap()
            .id
            .0;
        assert!(
            later
                .previous_backend_tag(0, moved_flow.hash(), address, 10)
                .is_some()
        );
        assert!(
            later
                .previous_backend_tag(0, moved_flow.hash(), address, until)
                .is_none()
        );
        // IP-in-IP has no key to carry it: nothing is kept.
        let mut ipip = snapshot(CONFIG);
        ipip.chain_from(
            &snapshot(&CONFIG.replace("198.18.23.2", "198.18.24.2")),
            until,
        );
        let frame = tcp4(CLIENT, POOL, 4242, 80, true, 0);
        let (_, out) = run(&ipip, &mut worker(), &frame, 10);
        assert_eq!(encap::decapsulate(&out).unwrap().gre_key, None);
    }

    #[test]
    fn drop_reasons_are_indexed_in_order() {
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason:?}");
        }
    }

    /// The golden table's encapsulated packets, checked by etherparse (outer header, inner packet
    /// untouched) apart from the table's pinned bytes (`golden::tests::the_table_holds`).
    #[test]
    fn golden_encapsulations_check_out() {
        let s = golden::snapshot();
        let mut checked = 0;
        for g in golden::table() {
            let (action, out) = g.decide(&s);
            assert_eq!(action, g.expected, "{}", g.description);
            let inner = &g.input[if g.link == Link::Ethernet { 14 } else { 0 }..];
            match action {
                Action::Encap { to, vip, .. } => check_encapsulated(
                    &out,
                    inner,
                    s.source_for(to).unwrap(),
                    to,
                    s.vips[usize::from(vip)].encap == Encap::Gre,
                ),
                Action::SnatReturn { to, .. } => {
                    check_encapsulated(&out, inner, s.source_for(to).unwrap(), to, false);
                }
                _ => continue,
            }
            checked += 1;
        }
        assert!(checked >= 8, "{checked}");
    }

    /// Every golden input is a correct packet: its IPv4 header checksum is right.
    #[test]
    fn golden_inputs_have_correct_ipv4_checksums() {
        for g in golden::table() {
            if g.expected == Action::Drop(DropReason::BadChecksum) {
                continue;
            }
            let ip = &g.input[if g.link == Link::Ethernet { 14 } else { 0 }..];
            if ip.len() >= 20 && ip[0] >> 4 == 4 {
                let h = Ipv4HeaderSlice::from_slice(ip).unwrap();
                assert_eq!(
                    h.header_checksum(),
                    h.to_header().calc_header_checksum(),
                    "{}",
                    g.description
                );
            }
        }
    }

    #[test]
    fn a_wrong_ipv4_header_checksum_is_dropped_as_bad_checksum() {
        let s = snapshot(CONFIG);
        let mut state = worker();
        // The encapsulated rows of bare IPv4 with a 20-byte header.
        let rows: Vec<golden::Golden> = golden::table()
            .into_iter()
            .filter(|g| {
                matches!(g.expected, Action::Encap { .. })
                    && g.link == Link::Ip
                    && g.input[0] == 0x45
            })
            .collect();
        assert!(rows.len() >= 3);
        for g in &rows {
            for at in [10, 11, 1, 8, 12, 19] {
                let mut bad = g.input.clone();
                bad[at] ^= 0x01;
                let (action, out) = run(&s, &mut state, &bad, 0);
                assert_eq!(
                    action,
                    Action::Drop(DropReason::BadChecksum),
                    "{}, byte {at}",
                    g.description
                );
                assert!(out.is_empty());
            }
            // Over Ethernet, through the fast path's link check.
            let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
            frame.extend_from_slice(&g.input);
            frame[14 + 10] ^= 0x80;
            let mut out = vec![0u8; 65535 + 48];
            assert_eq!(
                process(&frame, Link::Ethernet, &s, &mut state, 0, &mut out),
                Action::Drop(DropReason::BadChecksum),
                "{}, Ethernet",
                g.description
            );
        }
        assert_eq!(
            state.counters.dropped(DropReason::BadChecksum),
            rows.len() as u64 * 7
        );
        assert_eq!(state.counters.encapsulated, 0);
        assert_eq!(
            state.conntrack.occupancy().trusted + state.conntrack.occupancy().untrusted,
            0,
            "a corrupted packet creates no connection entry"
        );
        assert_eq!(DropReason::BadChecksum.name(), "bad_checksum");
        assert_eq!(
            DropReason::ALL[DropReason::ALL.len() - 1],
            DropReason::Internal
        );
    }

    /// Frames of every kind the decision meets, in an order where later frames depend on the
    /// state earlier ones leave (a SYN, then its flow's next packets, in one batch).
    fn mixed_frames() -> Vec<Vec<u8>> {
        let mut frames: Vec<Vec<u8>> = golden::table()
            .into_iter()
            .filter(|g| g.link == Link::Ip)
            .map(|g| g.input)
            .collect();
        for port in 40000..40040u16 {
            frames.push(tcp4(CLIENT, POOL, port, 80, true, 0));
            frames.push(tcp4(CLIENT, POOL, port, 80, false, 10));
            if port % 3 == 0 {
                frames.push(tcp4(CLIENT, POOL, port, 80, false, 0));
            }
        }
        let mut bad = tcp4(CLIENT, POOL, 1, 80, false, 0);
        bad[10] ^= 1;
        frames.push(bad);
        frames.push(with_flags(udp4(5353, 53), 0x2000));
        frames.push(with_df(tcp4(CLIENT, VIP, 40000, 80, false, 1460), true));
        frames.push(with_df(tcp4(CLIENT, VIP, 40000, 80, false, 1460), false));
        frames.push(tcp4(CLIENT, [198, 18, 100, 99], 40000, 80, true, 0));
        frames.push(vec![0x75; 40]);
        frames.push(tcp4(CLIENT, POOL, 7, 80, true, 0)[..30].to_vec());
        let reply = tcp4(POOL, CLIENT, 80, 40001, false, 0);
        let mut icmp = Vec::new();
        PacketBuilder::ipv4([198, 18, 9, 9], POOL, 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
            ))
            .write(&mut icmp, &reply[..28])
            .unwrap();
        frames.push(icmp);
        frames.push(udp6(1, 53));
        frames.push(tcp6(40000, 80, 0));
        frames
    }

    /// Everything observable after a run: the actions, the output packets, the counters.
    type Observed = (
        Vec<Action>,
        Vec<Vec<u8>>,
        Counters,
        crate::conntrack::ConnCounters,
    );

    fn one_by_one(s: &Snapshot, frames: &[Vec<u8>], link: Link, now: u64) -> Observed {
        let mut state = worker();
        let (mut actions, mut outs) = (Vec::new(), Vec::new());
        for f in frames {
            let mut out = vec![0u8; 65535 + 48];
            let action = process(f, link, s, &mut state, now, &mut out);
            let len = action.output_len();
            out.truncate(len);
            actions.push(action);
            outs.push(out);
        }
        (actions, outs, state.counters, state.conntrack.counters())
    }

    fn batched(s: &Snapshot, frames: &[Vec<u8>], link: Link, now: u64, size: usize) -> Observed {
        let mut state = worker();
        let (mut actions, mut outs) = (Vec::new(), Vec::new());
        for batch in frames.chunks(size) {
            let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
            let mut bufs = vec![vec![0u8; 65535 + 48]; batch.len()];
            let mut out_refs: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
            let mut got = vec![Action::Pass; batch.len()];
            let n = process_batch(&refs, link, s, &mut state, now, &mut out_refs, &mut got);
            assert_eq!(n, batch.len());
            for (action, mut out) in got.into_iter().zip(bufs) {
                let len = action.output_len();
                out.truncate(len);
                actions.push(action);
                outs.push(out);
            }
        }
        (actions, outs, state.counters, state.conntrack.counters())
    }

    #[test]
    fn batch_equals_one_by_one() {
        let s = snapshot(CONFIG);
        let frames = mixed_frames();
        let ethernet: Vec<Vec<u8>> = frames
            .iter()
            .map(|f| {
                let mut e = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
                let ethertype: u16 = if f.first().is_some_and(|b| b >> 4 == 6) {
                    0x86dd
                } else {
                    0x0800
                };
                e.extend_from_slice(&ethertype.to_be_bytes());
                e.extend_from_slice(f);
                e
            })
            .collect();
        for (frames, link) in [(&frames, Link::Ip), (&ethernet, Link::Ethernet)] {
            let expected = one_by_one(&s, frames, link, 5);
            assert!(expected.2.encapsulated > 80, "{:?}", expected.2);
            assert!(expected.3.hits > 30, "{:?}", expected.3);
            for size in [
                1,
                3,
                BATCH_ROUND - 1,
                BATCH_ROUND,
                BATCH_ROUND + 1,
                64,
                frames.len(),
            ] {
                assert_eq!(
                    batched(&s, frames, link, 5, size),
                    expected,
                    "{link:?}, batches of {size}"
                );
            }
        }
    }

    #[test]
    fn batch_handles_the_shortest_of_its_slices() {
        let s = snapshot(CONFIG);
        let mut state = worker();
        let frame = tcp4(CLIENT, POOL, 1, 80, true, 0);
        let frames = [frame.as_slice(); 5];
        let mut bufs = vec![vec![0u8; 2048]; 3];
        let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
        let mut actions = [Action::Pass; 4];
        let n = process_batch(
            &frames,
            Link::Ip,
            &s,
            &mut state,
            0,
            &mut outs,
            &mut actions,
        );
        assert_eq!(n, 3);
        assert_eq!(state.counters.packets, 3);
        assert!(matches!(actions[2], Action::Encap { .. }));
        assert_eq!(actions[3], Action::Pass, "untouched");
        assert_eq!(
            process_batch(&[], Link::Ip, &s, &mut state, 0, &mut outs, &mut actions),
            0
        );
    }

    proptest::proptest! {
        #[test]
        fn batch_equals_one_by_one_on_mutated_frames(
            mutations in proptest::collection::vec(
                (0usize..200, 0usize..1600, proptest::prelude::any::<u8>(), proptest::prelude::any::<bool>()),
                1..40,
            ),
            size in 1usize..40,
        ) {
            let s = snapshot(CONFIG);
            let base = mixed_frames();
            let frames: Vec<Vec<u8>> = mutations
                .iter()
                .map(|&(which, at, byte, fix)| {
                    let mut f = base[which % base.len()].clone();
                    if !f.is_empty() {
                        let at = at % f.len();
                        f[at] = byte;
                    }
                    // Half the time, a right checksum, so the mutation reaches the later steps.
                    let header_len = usize::from(f.first().map_or(0, |b| b & 0x0f)) * 4;
                    if fix && f[0] >> 4 == 4 && header_len >= 20 && f.len() >= header_len {
                        f[10..12].fill(0);
                        let mut sum: u32 = f[..header_len]
                            .chunks_exact(2)
                            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                            .sum();
                        while sum > 0xffff {
                            sum = (sum & 0xffff) + (sum >> 16);
                        }
                        f[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
                    }
                    f
                })
                .collect();
            proptest::prop_assert_eq!(
                batched(&s, &frames, Link::Ip, 1, size),
                one_by_one(&s, &frames, Link::Ip, 1)
            );
        }
    }

    #[test]
    fn too_big_with_df_gets_a_rate_limited_icmp_answer() {
        let s = snapshot(CONFIG);
        let mut state = worker();
        // 1500 bytes with DF: 20 bytes of IPv4-in-IPv4 overhead make 1520 > MTU 1500.
        let big = with_df(tcp4(CLIENT, VIP, 40000, 80, false, 1460), true);
        assert_eq!(big.len(), 1500);
        let (action, out) = run(&s, &mut state, &big, 0);
        let Action::IcmpReply { len } = action else {
            panic!("{action:?}")
        };
        assert_eq!(len, out.len());
        let ip = Ipv4HeaderSlice::from_slice(&out).unwrap();
        assert_eq!(
            (ip.source_addr(), ip.destination_addr()),
            (Ipv4Addr::from(VIP), Ipv4Addr::from(CLIENT))
        );
        assert_eq!(ip.protocol(), IpNumber::ICMP);
        assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum());
        let icmp = Icmpv4Slice::from_slice(&out[20..]).unwrap();
        assert_eq!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1480
            })
        );
        assert_eq!(
            icmp.icmp_type().calc_checksum(icmp.payload()),
            icmp.checksum()
        );
        assert_eq!(
            icmp.payload(),
            &big[..548],
            "quotes as much as fits in 576 bytes"
        );
        // 10 in a burst, then rate-limited until a token is earned (100 per second).
        for _ in 1..10 {
            assert!(matches!(
                run(&s, &mut state, &big, 0).0,
                Action::IcmpReply { .. }
            ));
        }
        assert_eq!(
            run(&s, &mut state, &big, 0).0,
            Action::Drop(DropReason::TooBigRateLimited)
        );
        assert!(matches!(
            run(&s, &mut state, &big, 10_000_000).0,
            Action::IcmpReply { .. }
        ));
        assert_eq!(state.counters.icmp_too_big_sent, 11);
        // Without DF the client cannot be told; the packet is dropped and counted.
        let fragmentable = with_df(tcp4(CLIENT, VIP, 40000, 80, false, 1460), false);
        assert_eq!(
            run(&s, &mut state, &fragmentable, 0).0,
            Action::Drop(DropReason::TooBigFragmentable)
        );
        // One byte less fits exactly.
        let fits = with_df(tcp4(CLIENT, VIP, 40000, 80, false, 1440), true);
        assert!(matches!(
            run(&s, &mut state, &fits, 0).0,
            Action::Encap { len: 1500, .. }
        ));
    }

    #[test]
    fn too_big_ipv6_gets_packet_too_big_with_the_overhead_subtracted() {
        let s = snapshot(CONFIG);
        let mut state = worker();
        let big = tcp6(40000, 80, 1440); // 1500 bytes; IPv6-in-IPv6 adds 40
        let (action, out) = run(&s, &mut state, &big, 0);
        assert!(matches!(action, Action::IcmpReply { .. }), "{action:?}");
        let ip = Ipv6HeaderSlice::from_slice(&out).unwrap();
        assert_eq!(
            (ip.source_addr(), ip.destination_addr()),
            (Ipv6Addr::from(VIP6), Ipv6Addr::from(CLIENT6))
        );
        let icmp = Icmpv6Slice::from_slice(&out[40..]).unwrap();
        assert_eq!(icmp.icmp_type(), Icmpv6Type::PacketTooBig { mtu: 1460 });
        assert!(out.len() <= 1280, "fits the IPv6 minimum MTU");
    }

    #[test]
    fn icmp_errors_reach_the_backend_of_the_connection() {
        let s = snapshot(CONFIG);
        let mut state = worker();
        // Many clients of the three-backend pool; each backend serves some of them.
        for port in 40000..40064u16 {
            let syn = tcp4(CLIENT, POOL, port, 80, true, 0);
            let Action::Encap { to, .. } = run(&s, &mut state, &syn, 0).0 else {
                panic!()
            };
            // A router answers the backend's reply (POOL:80 -> CLIENT:port) with an ICMP error.
            let reply = tcp4(POOL, CLIENT, 80, port, false, 0);
            let mut icmp = Vec::new();
            PacketBuilder::ipv4([198, 18, 9, 9], POOL, 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
                ))
                .write(&mut icmp, &reply[..28])
                .unwrap();
            let (action, out) = run(&s, &mut state, &icmp, 0);
            let Action::Encap { to: icmp_to, .. } = action else {
                panic!("{action:?}")
            };
            assert_eq!(icmp_to, to, "client port {port}");
            check_encapsulated(&out, &icmp, s.source_for(to).unwrap(), to, false);
        }
    }

    #[test]
    fn fragments_of_a_datagram_reach_one_backend_untracked() {
        let s = snapshot(CONFIG);
        let mut state = worker();
        let first = with_flags(udp4(5353, 53), 0x2000); // MF, offset 0
        let later = with_flags(udp4(5353, 53), 2); // offset 16 bytes
        let a = run(&s, &mut state, &first, 0).0;
        let b = run(&s, &mut state, &later, 0).0;
        assert!(matches!(a, Action::Encap { vip: 4, .. }), "{a:?}");
        assert_eq!(a, b);
        assert_eq!(
            state.conntrack.occupancy().trusted + state.conntrack.occupancy().untrusted,
            0
        );
    }

    #[test]
    fn fragments_to_an_address_with_several_port_vips_are_dropped_as_ambiguous() {
        let s = snapshot(CONFIG); // TCP ports 80 and 81 on 198.18.100.1
        let mut state = worker();
        let fragment = with_flags(tcp4(CLIENT, VIP, 40000, 80, false, 64), 0x2000);
        assert_eq!(
            run(&s, &mut state, &fragment, 0).0,
            Action::Drop(DropReason::FragmentVipAmbiguous)
        );
        // A fragment to an address with no VIP of its protocol is simply unmatched.
        let elsewhere = with_flags(
            tcp4(CLIENT, [198, 18, 100, 77], 40000, 80, false, 64),
            0x2000,
        );
        assert_eq!(run(&s, &mut state, &elsewhere, 0).0, Action::Pass);
    }

    #[test]
    fn unmatched_traffic_follows_the_node_policy() {
        let s = snapshot(CONFIG);
        let mut state = worker();
        let other = tcp4(CLIENT, [198, 18, 100, 99], 40000, 80, true, 0);
        assert_eq!(run(&s, &mut state, &other, 0).0, Action::Pass);
        let mut echo = Vec::new();
        PacketBuilder::ipv4(CLIENT, VIP, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut echo, b"ping")
            .unwrap();
        assert_eq!(run(&s, &mut state, &echo, 0).0, Action::Pass);
        let dropping = snapshot(&CONFIG.replace("ttl = 63", "ttl = 63\nunmatched = \"drop\""));
        assert_eq!(
            run(&dropping, &mut state, &other, 0).0,
            Action::Drop(DropReason::NoVip)
        );
        assert_eq!(state.counters.dropped(DropReason::NoVip), 1);
        assert_eq!(state.counters.passed, 2);
    }

    #[test]
    fn malformed_frames_are_dropped_with_their_reason() {
        let s = snapshot(CONFIG);
        let mut state = worker();
        let syn = tcp4(CLIENT, VIP, 40000, 80, true, 0);
        assert_eq!(
            run(&s, &mut state, &syn[..30], 0).0,
            Action::Drop(DropReason::Truncated)
        );
        assert_eq!(
            run(&s, &mut state, &[0x75; 40], 0).0,
            Action::Drop(DropReason::Malformed)
        );
        let mut icmp = Vec::new();
        PacketBuilder::ipv4([198, 18, 9, 9], VIP, 64)
            .icmpv4(Icmpv4Type::TimeExceeded(
                etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
            ))
            .write(&mut icmp, &syn[..22])
            .unwrap();
        assert_eq!(
            run(&s, &mut state, &icmp, 0).0,
            Action::Drop(DropReason::BadIcmpQuote)
        );
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&0x0806u16.to_be_bytes());
        frame.extend_from_slice(&[0; 28]);
        let mut out = vec![0; 100];
        assert_eq!(
            process(&frame, Link::Ethernet, &s, &mut state, 0, &mut out),
            Action::Pass,
            "ARP"
        );
        assert_eq!(state.counters.packets, 4);
    }

    /// Opens `port`'s connection to the pool under `s`: SYN, ACK, then data (the third packet
    /// takes the tracked flow out of the new entries a flood may evict, as a real connection's
    /// first data does). Returns its backend.
    fn establish(s: &Snapshot, state: &mut WorkerState, port: u16) -> IpAddr {
        let to = pool_backend(s, state, port, true);
        assert_eq!(pool_backend(s, state, port, false), to);
        assert_eq!(pool_backend(s, state, port, false), to);
        to
    }

    /// Backend of one packet of `port`'s flow to the pool.
    fn pool_backend(s: &Snapshot, state: &mut WorkerState, port: u16, syn: bool) -> IpAddr {
        match run(s, state, &tcp4(CLIENT, POOL, port, 80, syn, 0), 0).0 {
            Action::Encap { to, .. } => to,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tracked_flows_survive_reloads_while_their_backend_stays() {
        let before = snapshot(CONFIG);
        // be4 joins the pool: the table moves about a quarter of the flows to it.
        let after = snapshot(&CONFIG.replace(
            "[[vip.backend]]\n        address = \"198.18.23.2\"",
            "[[vip.backend]]\n        address = \"198.18.23.2\"\n        [[vip.backend]]\n        address = \"198.18.24.2\"",
        ));
        assert_eq!(after.vips[6].table.backends().len(), 4);
        let mut state = worker();
        let ports: Vec<u16> = (40000..40400).collect();
        let first: Vec<IpAddr> = ports
            .iter()
            .map(|&p| establish(&before, &mut state, p))
            .collect();
        let mut moved_by_table = 0;
        for (&port, &was) in ports.iter().zip(&first) {
            assert_eq!(
                pool_backend(&after, &mut state, port, false),
                was,
                "tracked flow {port} kept its backend"
            );
            let flow = FlowKey::v4(
                Ipv4Addr::from(CLIENT),
                Ipv4Addr::from(POOL),
                PROTO_TCP,
                port,
                80,
            );
            let table_choice = after.vips[6]
                .table
                .lookup_backend(flow.hash())
                .unwrap()
                .id
                .0;
            moved_by_table += usize::from(table_choice != was);
        }
        assert!(
            moved_by_table > 50,
            "the new table would have moved {moved_by_table} of 400"
        );
        // A new worker (no conntrack) follows the new table.
        let mut fresh = worker();
        let to_be4 = ports
            .iter()
            .filter(|&&p| pool_backend(&after, &mut fresh, p, true) == v4([198, 18, 24, 2]))
            .count();
        assert!(to_be4 > 50, "{to_be4}");
        assert_eq!(state.counters.dropped(DropReason::Internal), 0);
    }

    #[test]
    fn removed_backend_loses_its_flows_and_drained_backend_keeps_them() {
        let s = snapshot(CONFIG);
        let mut state = worker();
        let ports: Vec<u16> = (41000..41300).collect();
        let first: Vec<IpAddr> = ports
            .iter()
            .map(|&p| establish(&s, &mut state, p))
            .collect();
        let be2 = v4([198, 18, 22, 2]);
        assert!(first.contains(&be2));
        // Drain be2 (weight 0): its tracked flows continue; new flows never reach it.
        let drained = snapshot(&CONFIG.replace(
            "address = \"198.18.22.2\"\n        [[vip.backend]]",
            "address = \"198.18.22.2\"\n        weight = 0\n        [[vip.backend]]",
        ));
        assert_eq!(drained.vips[6].table.backends()[1].weight, 0);
        for (&port, &was) in ports.iter().zip(&first) {
            assert_eq!(pool_backend(&drained, &mut state, port, false), was);
        }
        let mut fresh = worker();
        assert!(
            ports
                .iter()
                .all(|&p| pool_backend(&drained, &mut fresh, p + 1000, true) != be2)
        );
        // Remove be2: its flows fall back to the table; the others keep their backends.
        let removed = snapshot(&CONFIG.replace(
            "[[vip.backend]]\n        address = \"198.18.22.2\"\n        [[vip.backend]]",
            "[[vip.backend]]",
        ));
        assert_eq!(removed.vips[6].table.backends().len(), 2);
        for (&port, &was) in ports.iter().zip(&first) {
            let now = pool_backend(&removed, &mut state, port, false);
            if was == be2 {
                assert_ne!(now, be2);
            } else {
                assert_eq!(now, was, "flow {port} of a remaining backend moved");
            }
        }
        assert_eq!(state.counters.dropped(DropReason::Internal), 0);
    }

    #[test]
    fn a_full_connection_table_still_forwards_by_the_table() {
        let s = snapshot(CONFIG);
        let mut state = WorkerState::new(ConnTable::new(ConnTableConfig {
            capacity: 8,
            ..ConnTableConfig::default()
        }));
        for port in 0..2000u16 {
            let flow = FlowKey::v4(
                Ipv4Addr::from(CLIENT),
                Ipv4Addr::from(POOL),
                PROTO_TCP,
                port,
                80,
            );
            let expected = s.vips[6].table.lookup_backend(flow.hash()).unwrap().id.0;
            assert_eq!(pool_backend(&s, &mut state, port, true), expected);
        }
        // New flows are untrusted: past the quota they evict each other, or find no room.
        let c = state.conntrack.counters();
        assert!(c.full + c.evictions_untrusted > 1900, "{c:?}");
        assert_eq!(state.counters.encapsulated, 2000);
    }

    #[test]
    fn a_vip_without_backends_drops_with_no_backend() {
        let text = CONFIG.replace("port = 81\n        encap = \"ipip\"\n        [[vip.backend]]\n        address = \"2001:db8:21::2\"", "port = 81\n        encap = \"ipip\"");
        let s = snapshot(&text);
        let mut state = worker();
        assert_eq!(
            run(&s, &mut state, &tcp4(CLIENT, VIP, 1, 81, true, 0), 0).0,
            Action::Drop(DropReason::NoBackend)
        );
    }
}
