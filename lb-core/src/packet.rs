//! Packet parsing for the forwarding decision: from a received frame to the [`Parsed`] facts the
//! mux steers by.
//!
//! Ethernet (with up to two VLAN tags) is read here; IPv4 (with options), IPv6 (with extension
//! headers), TCP, UDP, ICMP and ICMPv6 are read with etherparse's zero-copy slices.
//!
//! **Invariant.** No input panics: every malformed or truncated frame gives a [`ParseError`], a
//! small `Copy` value naming the layer, which maps to a drop counter. A frame that is not IP
//! (ARP, LLDP) is not an error: it is [`Kind::NotIp`], for the host's own stack.
//!
//! **Strictness.** Beyond the lengths etherparse checks, a frame is refused when:
//! - its IP version is not its EtherType's (an IPv4 header in an `0x86DD` frame, or the reverse):
//!   [`ParseError::VersionMismatch`];
//! - an IPv4 option other than end-of-list and no-operation has a length below 2 or runs past
//!   the header (RFC 791): [`ParseError::BadIpOptions`];
//! - an unfragmented UDP datagram's length field is not exactly its IP payload (length 0
//!   included, which IPv4 has no use for and which this mux does not take as an IPv6 jumbogram):
//!   [`ParseError::Malformed`] at [`Layer::Udp`].
//!
//! The TTL or hop limit is read into [`Parsed::ttl`] and the source into the flow, for the
//! forwarding decision to refuse expired and martian packets (`forward`).
//!
//! **Checksums.** The received IPv4 header's checksum is verified, options included, as soon as
//! the whole header is present (as Linux's `ip_rcv` does): a wrong one is
//! [`ParseError::BadChecksum`]. Headers quoted in ICMP errors are not checked: a quote may be cut
//! short, and routers quote what they received. TCP, UDP and ICMP checksums are not checked: the
//! backend verifies them, and the mux forwards the packet untouched.
//!
//! **Steering facts** ([`Kind`]):
//! - TCP and UDP (not fragmented): the 5-tuple.
//! - Fragments, first and later alike: the 3-tuple (ports 0). Later fragments carry no ports, so
//!   the first one is steered the same way, and every fragment of a datagram reaches the same
//!   backend, which reassembles it. The cost: a flow that mixes fragmented and whole packets
//!   can reach two backends. TCP sets DF and does not fragment, so in practice this is UDP.
//! - ICMP and ICMPv6 errors (destination unreachable, packet too big, time exceeded, parameter
//!   problem): the 5-tuple of the packet they quote. A VIP receives errors about packets its
//!   backends sent (VIP → client); the decision steers by that flow reversed, the client's flow,
//!   so the error reaches the backend that owns the connection (RFC 792, RFC 4443).
//! - Anything else (ICMP echo, other protocols): the 3-tuple.

use std::net::IpAddr;

use etherparse::{
    Icmpv4Type, Icmpv6Type, IpNumber, LaxNetSlice, LaxSlicedPacket, NetSlice, SlicedPacket,
    TransportSlice, err::packet::SliceError,
};

use crate::flow::FlowKey;

/// What the device hands over: whole Ethernet frames, or bare IP packets (TUN, cooked sockets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Ethernet II, optionally with 802.1Q / 802.1ad VLAN tags.
    Ethernet,
    /// The frame starts at the IP header.
    Ip,
}

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// The layer at which a frame was found wanting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layer {
    /// The Ethernet header or a VLAN tag.
    Ethernet,
    /// The IP header (v4 or v6), its options, or its length fields.
    Ip,
    /// An IPv6 extension header or an IPv4 authentication header.
    IpExtension,
    /// The TCP header.
    Tcp,
    /// The UDP header.
    Udp,
    /// The ICMP or ICMPv6 header.
    Icmp,
    /// The packet quoted inside an ICMP error.
    IcmpQuote,
}

/// Why a frame cannot be parsed. Small and `Copy`: the hot path counts it and drops the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ParseError {
    /// The frame ends before a header (or a length field) says it should.
    #[error("truncated at the {layer:?} layer: {required} bytes needed, {found} present")]
    Truncated {
        /// Where.
        layer: Layer,
        /// Bytes the layer needs.
        required: usize,
        /// Bytes present.
        found: usize,
    },
    /// A header with impossible contents (bad version, header length, or length fields).
    #[error("malformed {layer:?} header")]
    Malformed {
        /// Where.
        layer: Layer,
    },
    /// A header whose checksum is wrong: the received IPv4 header (not one quoted in an ICMP
    /// error, which may be cut short).
    #[error("bad {layer:?} header checksum")]
    BadChecksum {
        /// Where: [`Layer::Ip`].
        layer: Layer,
    },
    /// An IP header of the other version than the frame's EtherType says.
    #[error("IPv{version} header in a frame of EtherType {ethertype:#06x}")]
    VersionMismatch {
        /// The frame's EtherType.
        ethertype: u16,
        /// The header's version.
        version: u8,
    },
    /// An IPv4 option whose length is below 2 or runs past the header.
    #[error("IPv4 option of a bad length")]
    BadIpOptions,
}

/// What the forwarding decision needs to know about a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed<'a> {
    /// The IP packet, from its header to the end of its IP length. A link-layer header and any
    /// trailing padding are excluded, so this is exactly what gets encapsulated.
    pub ip: &'a [u8],
    /// Where `ip` starts in the frame.
    pub ip_offset: usize,
    /// Whether routers may not fragment it: IPv4's DF bit, always true for IPv6.
    pub dont_fragment: bool,
    /// IPv4's TTL or IPv6's hop limit (0 for a frame that is not IP).
    pub ttl: u8,
    /// What to steer by.
    pub kind: Kind,
}

/// The steering facts of a frame (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An unfragmented TCP or UDP packet.
    Transport {
        /// Its 5-tuple.
        flow: FlowKey,
        /// TCP SYN without ACK: the first packet of a new connection.
        syn: bool,
    },
    /// A fragment of a datagram (first or later).
    Fragment {
        /// Its 3-tuple (ports 0).
        flow: FlowKey,
    },
    /// An ICMP or ICMPv6 error quoting a packet.
    IcmpError {
        /// The error's own addresses and protocol (ports 0).
        flow: FlowKey,
        /// The quoted packet's 5-tuple, as quoted (ports 0 if it has none).
        quoted: FlowKey,
    },
    /// Any other IP packet (ICMP echo, other protocols).
    OtherIp {
        /// Its 3-tuple (ports 0).
        flow: FlowKey,
    },
    /// Not an IP packet (ARP, LLDP…): for the host's stack.
    NotIp {
        /// Its EtherType.
        ethertype: u16,
    },
}

impl Kind {
    /// The flow the frame belongs to, if it is IP.
    #[must_use]
    pub fn flow(&self) -> Option<FlowKey> {
        match *self {
            Self::Transport { flow, .. }
            | Self::Fragment { flow }
            | Self::IcmpError { flow, .. }
            | Self::OtherIp { flow } => Some(flow),
            Self::NotIp { .. } => None,
        }
    }
}

/// Parses one frame. Never panics; see the module docs for what each [`Kind`] means.
///
/// The common case, IPv4 without options carrying unfragmented TCP or UDP, is read directly
/// (`parse_ipv4_fast`); everything else, including every malformed frame, goes through
/// etherparse. `tests::fast_path_agrees_with_etherparse` checks the two agree.
#[inline]
pub fn parse(frame: &[u8], link: Link) -> Result<Parsed<'_>, ParseError> {
    match parse_fast(frame, link) {
        Some(parsed) => Ok(parsed),
        None => parse_general(frame, link),
    }
}

/// The fast path alone: `Some` exactly when [`parse`] would take it, always a
/// [`Kind::Transport`]. The forwarding decision calls it and `parse_general` apart, so that the
/// common case is compiled knowing its kind.
#[inline(always)]
pub(crate) fn parse_fast(frame: &[u8], link: Link) -> Option<Parsed<'_>> {
    let ip_offset = match link {
        Link::Ip => 0,
        Link::Ethernet => match frame.get(12..14) {
            Some([0x08, 0x00]) => 14,
            _ => return None,
        },
    };
    parse_ipv4_fast(frame, ip_offset)
}

/// IPv4 with a 20-byte header, not a fragment, carrying TCP or UDP whose header fits: the
/// facts read straight from the bytes. `None` for anything else (the general path decides).
#[inline(always)]
fn parse_ipv4_fast(frame: &[u8], ip_offset: usize) -> Option<Parsed<'_>> {
    let ip = frame.get(ip_offset..)?;
    let header: &[u8; 20] = ip.get(..20)?.try_into().ok()?;
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let flags_fragment = u16::from_be_bytes([header[6], header[7]]);
    let protocol = header[9];
    // Version 4, IHL 5; no MF bit and offset 0; a length that fits the frame.
    if header[0] != 0x45 || flags_fragment & 0x3fff != 0 || total_len < 20 || total_len > ip.len() {
        return None;
    }
    // A wrong checksum is the general path's to report.
    if !ipv4_header20_checksum_ok(header) {
        return None;
    }
    let ip = &ip[..total_len];
    let l4 = &ip[20..];
    let syn = match protocol {
        crate::flow::PROTO_TCP => {
            let data_offset = usize::from(*l4.get(12)? >> 4) * 4;
            if data_offset < 20 || data_offset > l4.len() {
                return None;
            }
            l4[13] & 0x12 == 0x02 // SYN without ACK
        }
        crate::flow::PROTO_UDP => {
            // Exactly the IP payload (the general path refuses anything else).
            let udp_len = usize::from(u16::from_be_bytes([*l4.get(4)?, *l4.get(5)?]));
            if udp_len != l4.len() {
                return None;
            }
            false
        }
        _ => return None,
    };
    let src = std::net::Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst = std::net::Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    let flow = FlowKey::v4(
        src,
        dst,
        protocol,
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
    );
    Some(Parsed {
        ip,
        ip_offset,
        dont_fragment: flags_fragment & 0x4000 != 0,
        ttl: header[8],
        kind: Kind::Transport { flow, syn },
    })
}

/// Every frame the fast path does not take: etherparse's slices.
pub(crate) fn parse_general(frame: &[u8], link: Link) -> Result<Parsed<'_>, ParseError> {
    let ip_offset = match link {
        Link::Ip => 0,
        Link::Ethernet => match ethernet_payload(frame)? {
            (offset, ethertype @ (ETHERTYPE_IPV4 | ETHERTYPE_IPV6)) => {
                let version = frame.get(offset).map_or(0, |b| b >> 4);
                let expected = if ethertype == ETHERTYPE_IPV4 { 4 } else { 6 };
                if (version == 4 || version == 6) && version != expected {
                    return Err(ParseError::VersionMismatch { ethertype, version });
                }
                offset
            }
            (_, ethertype) => {
                return Ok(Parsed {
                    ip: &[],
                    ip_offset: frame.len(),
                    dont_fragment: false,
                    ttl: 0,
                    kind: Kind::NotIp { ethertype },
                });
            }
        },
    };
    let ip = &frame[ip_offset..];
    check_ipv4_checksum(ip)?;
    check_ipv4_options(ip)?;
    let sliced = SlicedPacket::from_ip(ip).map_err(|e| map_slice_error(&e))?;
    let (ip_len, src, dst, dont_fragment, ttl, payload) = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => {
            let h = v4.header();
            (
                usize::from(h.total_len()),
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
                h.dont_fragment(),
                h.ttl(),
                v4.payload(),
            )
        }
        Some(NetSlice::Ipv6(v6)) => {
            let h = v6.header();
            (
                40 + usize::from(h.payload_length()),
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                true,
                h.hop_limit(),
                v6.payload(),
            )
        }
        // from_ip only yields IP; anything else is a malformed IP header.
        _ => return Err(ParseError::Malformed { layer: Layer::Ip }),
    };
    let ip = ip.get(..ip_len).ok_or(ParseError::Truncated {
        layer: Layer::Ip,
        required: ip_len,
        found: ip.len(),
    })?;
    let protocol = payload.ip_number.0;
    let three_tuple =
        FlowKey::new(src, dst, protocol, 0, 0).ok_or(ParseError::Malformed { layer: Layer::Ip })?;
    let kind = if payload.fragmented {
        Kind::Fragment { flow: three_tuple }
    } else {
        match &sliced.transport {
            Some(TransportSlice::Tcp(tcp)) => Kind::Transport {
                flow: FlowKey::new(
                    src,
                    dst,
                    protocol,
                    tcp.source_port(),
                    tcp.destination_port(),
                )
                .ok_or(ParseError::Malformed { layer: Layer::Ip })?,
                syn: tcp.syn() && !tcp.ack(),
            },
            Some(TransportSlice::Udp(udp))
                if usize::from(udp.length()) != payload.payload.len() =>
            {
                return Err(ParseError::Malformed { layer: Layer::Udp });
            }
            Some(TransportSlice::Udp(udp)) => Kind::Transport {
                flow: FlowKey::new(
                    src,
                    dst,
                    protocol,
                    udp.source_port(),
                    udp.destination_port(),
                )
                .ok_or(ParseError::Malformed { layer: Layer::Ip })?,
                syn: false,
            },
            Some(TransportSlice::Icmpv4(icmp)) => match icmp.icmp_type() {
                Icmpv4Type::DestinationUnreachable(_)
                | Icmpv4Type::TimeExceeded(_)
                | Icmpv4Type::ParameterProblem(_) => Kind::IcmpError {
                    flow: three_tuple,
                    quoted: quoted_flow(icmp.payload())?,
                },
                _ => Kind::OtherIp { flow: three_tuple },
            },
            Some(TransportSlice::Icmpv6(icmp)) => match icmp.icmp_type() {
                Icmpv6Type::DestinationUnreachable(_)
                | Icmpv6Type::PacketTooBig { .. }
                | Icmpv6Type::TimeExceeded(_)
                | Icmpv6Type::ParameterProblem(_) => Kind::IcmpError {
                    flow: three_tuple,
                    quoted: quoted_flow(icmp.payload())?,
                },
                _ => Kind::OtherIp { flow: three_tuple },
            },
            _ => Kind::OtherIp { flow: three_tuple },
        }
    };
    Ok(Parsed {
        ip,
        ip_offset,
        dont_fragment,
        ttl,
        kind,
    })
}

/// Checks the options of the IPv4 header at the start of `ip`, once the whole header is there
/// (RFC 791 §3.1): end-of-list (0) ends them, no-operation (1) is one byte, every other option
/// has a length byte of at least 2 that stays within the header. Anything else (IPv6, a bad IHL,
/// a header cut short) is left to etherparse, which reports it.
fn check_ipv4_options(ip: &[u8]) -> Result<(), ParseError> {
    let Some(&first) = ip.first() else {
        return Ok(());
    };
    let header_len = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header_len <= 20 {
        return Ok(());
    }
    let Some(options) = ip.get(20..header_len) else {
        return Ok(());
    };
    let mut at = 0;
    while let Some(&kind) = options.get(at) {
        match kind {
            0 => break,
            1 => at += 1,
            _ => match options.get(at + 1) {
                Some(&len) if len >= 2 && at + usize::from(len) <= options.len() => {
                    at += usize::from(len);
                }
                _ => return Err(ParseError::BadIpOptions),
            },
        }
    }
    Ok(())
}

/// Verifies the checksum of the IPv4 header at the start of `ip`, options included, once the
/// whole header is there. Anything else (IPv6, a bad IHL, a header cut short) is left to
/// etherparse, which reports it.
fn check_ipv4_checksum(ip: &[u8]) -> Result<(), ParseError> {
    let Some(&first) = ip.first() else {
        return Ok(());
    };
    let header_len = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header_len < 20 {
        return Ok(());
    }
    match ip.get(..header_len) {
        Some(header) if !ipv4_header_checksum_ok(header) => {
            Err(ParseError::BadChecksum { layer: Layer::Ip })
        }
        _ => Ok(()),
    }
}

/// Whether an IPv4 header (a multiple of 4 bytes long, as its IHL makes it) sums to `0xFFFF`
/// in one's complement (RFC 1071), checksum field included: its checksum is right.
///
/// The sum runs over native-endian 32-bit words: one's complement sums are independent of byte
/// order (RFC 1071 §2(B)), and the result `0xFFFF` is its own byte swap. Folding the carries
/// back in (2^16 ≡ 1 mod 0xFFFF) keeps the sum's value mod 0xFFFF and never turns a non-zero sum
/// into 0, so the folded sum is `0xFFFF` exactly when the plain sum is a non-zero multiple of
/// 0xFFFF: one multiply-shift instead of the folds. About 15 instructions for 20 bytes.
#[inline]
fn ipv4_header_checksum_ok(header: &[u8]) -> bool {
    // At most 15 words: the sum is below 2^36.
    let sum: u64 = header
        .chunks_exact(4)
        .map(|w| u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .sum();
    sum != 0 && sum.is_multiple_of(0xffff)
}

/// [`ipv4_header_checksum_ok`] for a header without options: five loads, unrolled.
#[inline(always)]
fn ipv4_header20_checksum_ok(h: &[u8; 20]) -> bool {
    let word = |at: usize| u64::from(u32::from_ne_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]));
    let sum = word(0) + word(4) + word(8) + word(12) + word(16);
    sum != 0 && sum.is_multiple_of(0xffff)
}

/// The offset of the Ethernet payload and its EtherType, past up to two VLAN tags.
fn ethernet_payload(frame: &[u8]) -> Result<(usize, u16), ParseError> {
    let ethertype_at = |at: usize| {
        frame
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or(ParseError::Truncated {
                layer: Layer::Ethernet,
                required: at + 2,
                found: frame.len(),
            })
    };
    let mut at = 12;
    for _ in 0..2 {
        match ethertype_at(at)? {
            ETHERTYPE_VLAN | ETHERTYPE_QINQ => at += 4,
            _ => break,
        }
    }
    let ethertype = ethertype_at(at)?;
    Ok((at + 2, ethertype))
}

/// The 5-tuple of the packet quoted in an ICMP error: its IP header and at least the first 8
/// bytes of its payload, which hold the ports of TCP and UDP (RFC 792, RFC 4443).
fn quoted_flow(quote: &[u8]) -> Result<FlowKey, ParseError> {
    let malformed = ParseError::Malformed {
        layer: Layer::IcmpQuote,
    };
    let sliced = LaxSlicedPacket::from_ip(quote).map_err(|_| malformed)?;
    let (src, dst, payload) = match &sliced.net {
        Some(LaxNetSlice::Ipv4(v4)) => {
            let h = v4.header();
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
                v4.payload(),
            )
        }
        Some(LaxNetSlice::Ipv6(v6)) => {
            let h = v6.header();
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                v6.payload(),
            )
        }
        _ => return Err(malformed),
    };
    let protocol = payload.ip_number;
    let (src_port, dst_port) = if payload.fragmented {
        // A quoted fragment: later ones carry no ports, and etherparse's lax slice does not say
        // which one this is, so every quoted fragment counts as port-less. Rare: it means the
        // backend's own reply was fragmented.
        (0, 0)
    } else if protocol == IpNumber::TCP || protocol == IpNumber::UDP {
        match payload.payload.get(..4) {
            Some(p) => (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            ),
            None => {
                return Err(ParseError::Truncated {
                    layer: Layer::IcmpQuote,
                    required: 4,
                    found: payload.payload.len(),
                });
            }
        }
    } else {
        (0, 0)
    };
    FlowKey::new(src, dst, protocol.0, src_port, dst_port).ok_or(malformed)
}

/// Maps etherparse's error to the layer it concerns.
fn map_slice_error(e: &SliceError) -> ParseError {
    let layer_of = |l: etherparse::err::Layer| {
        use etherparse::err::Layer as L;
        match l {
            L::Ipv6ExtHeader
            | L::IpAuthHeader
            | L::Ipv6FragHeader
            | L::Ipv6HopByHopHeader
            | L::Ipv6RouteHeader => Layer::IpExtension,
            L::TcpHeader => Layer::Tcp,
            L::UdpHeader => Layer::Udp,
            L::Icmpv4 | L::Icmpv4Timestamp | L::Icmpv4TimestampReply | L::Icmpv6 => Layer::Icmp,
            _ => Layer::Ip,
        }
    };
    match e {
        SliceError::Len(len) => ParseError::Truncated {
            layer: layer_of(len.layer),
            required: len.required_len,
            found: len.len,
        },
        SliceError::Ipv4Exts(_) | SliceError::Ipv6Exts(_) => ParseError::Malformed {
            layer: Layer::IpExtension,
        },
        SliceError::Tcp(_) => ParseError::Malformed { layer: Layer::Tcp },
        _ => ParseError::Malformed { layer: Layer::Ip },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{PROTO_TCP, PROTO_UDP};
    use etherparse::{IpFragOffset, Ipv4Header, Ipv6FragmentHeader, PacketBuilder};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const CLIENT: [u8; 4] = [198, 18, 1, 2];
    const VIP: [u8; 4] = [198, 18, 100, 1];
    const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const VIP6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

    fn tcp_syn_v4() -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(CLIENT, VIP, 64)
            .tcp(40000, 80, 1, 65535)
            .syn()
            .write(&mut out, b"")
            .unwrap();
        out
    }

    fn udp_v6(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv6(CLIENT6, VIP6, 64)
            .udp(5353, 53)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    fn ethernet(ethertype: u16, vlans: usize, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        for _ in 0..vlans {
            f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
            f.extend_from_slice(&[0, 42]);
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn v4_flow(protocol: u8, sport: u16, dport: u16) -> FlowKey {
        FlowKey::v4(
            Ipv4Addr::from(CLIENT),
            Ipv4Addr::from(VIP),
            protocol,
            sport,
            dport,
        )
    }

    #[test]
    fn tcp_syn_over_ethernet_and_bare_ip() {
        let ip = tcp_syn_v4();
        for (frame, link, offset) in [
            (ip.clone(), Link::Ip, 0),
            (ethernet(ETHERTYPE_IPV4, 0, &ip), Link::Ethernet, 14),
            (ethernet(ETHERTYPE_IPV4, 2, &ip), Link::Ethernet, 22),
        ] {
            let p = parse(&frame, link).unwrap();
            assert_eq!(p.ip, ip.as_slice());
            assert_eq!(p.ip_offset, offset);
            assert_eq!(
                p.kind,
                Kind::Transport {
                    flow: v4_flow(PROTO_TCP, 40000, 80),
                    syn: true
                }
            );
        }
    }

    #[test]
    fn trailing_padding_is_not_part_of_the_ip_packet() {
        let ip = tcp_syn_v4();
        let mut frame = ethernet(ETHERTYPE_IPV4, 0, &ip);
        frame.extend_from_slice(&[0; 6]); // Ethernet minimum-size padding
        assert_eq!(parse(&frame, Link::Ethernet).unwrap().ip, ip.as_slice());
    }

    #[test]
    fn ipv4_with_options_and_df() {
        let mut header = Ipv4Header::new(8, 64, IpNumber::UDP, CLIENT, VIP).unwrap();
        header.options = [1, 1, 1, 0].as_slice().try_into().unwrap(); // NOP NOP NOP EOL
        header.dont_fragment = true;
        let mut out = Vec::new();
        PacketBuilder::ip(etherparse::IpHeaders::Ipv4(header, Default::default()))
            .udp(1000, 53)
            .write(&mut out, b"")
            .unwrap();
        let p = parse(&out, Link::Ip).unwrap();
        assert!(p.dont_fragment);
        assert_eq!(
            p.kind,
            Kind::Transport {
                flow: v4_flow(PROTO_UDP, 1000, 53),
                syn: false
            }
        );
    }

    #[test]
    fn ipv6_with_extension_headers() {
        let payload = udp_v6(b"hello");
        // Insert a hop-by-hop options header (8 bytes: next header UDP, length 0, PadN).
        let mut p = payload[..40].to_vec();
        p[6] = 0; // next header: hop-by-hop
        p[4..6].copy_from_slice(&(u16::from_be_bytes([payload[4], payload[5]]) + 8).to_be_bytes());
        p.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
        p.extend_from_slice(&payload[40..]);
        let parsed = parse(&p, Link::Ip).unwrap();
        assert!(parsed.dont_fragment);
        let flow = FlowKey::v6(
            Ipv6Addr::from(CLIENT6),
            Ipv6Addr::from(VIP6),
            PROTO_UDP,
            5353,
            53,
        );
        assert_eq!(parsed.kind, Kind::Transport { flow, syn: false });
    }

    #[test]
    fn fragments_are_steered_by_the_three_tuple() {
        let ip = tcp_syn_v4();
        // First fragment: MF set, offset 0. Later fragment: offset 8 (64 bytes).
        for (more, offset) in [(true, 0u16), (false, 8)] {
            let mut f = ip.clone();
            let flags = if more { 0x2000 } else { 0 } | offset;
            f[6..8].copy_from_slice(&flags.to_be_bytes());
            let (h, _) = Ipv4Header::from_slice(&f).unwrap();
            f[10..12].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
            let p = parse(&f, Link::Ip).unwrap();
            assert_eq!(
                p.kind,
                Kind::Fragment {
                    flow: v4_flow(PROTO_TCP, 0, 0)
                },
                "more={more} offset={offset}"
            );
        }
        // IPv6 later fragment.
        let v6 = udp_v6(b"datagram");
        let mut f = v6[..40].to_vec();
        f[6] = 44; // fragment header
        f[4..6].copy_from_slice(&(u16::from_be_bytes([v6[4], v6[5]]) + 8).to_be_bytes());
        let frag =
            Ipv6FragmentHeader::new(IpNumber::UDP, IpFragOffset::try_new(1).unwrap(), false, 7);
        f.extend_from_slice(&frag.to_bytes());
        f.extend_from_slice(&v6[40..]);
        let flow = FlowKey::v6(
            Ipv6Addr::from(CLIENT6),
            Ipv6Addr::from(VIP6),
            PROTO_UDP,
            0,
            0,
        );
        assert_eq!(parse(&f, Link::Ip).unwrap().kind, Kind::Fragment { flow });
    }

    #[test]
    fn icmp_errors_carry_the_quoted_flow() {
        // A router tells the VIP that the backend's reply (VIP:80 -> client:40000) was too big.
        let mut reply = Vec::new();
        PacketBuilder::ipv4(VIP, CLIENT, 64)
            .tcp(80, 40000, 1, 65535)
            .ack(1)
            .write(&mut reply, &[0u8; 100])
            .unwrap();
        let mut icmp = Vec::new();
        PacketBuilder::ipv4([198, 18, 9, 9], VIP, 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400,
                },
            ))
            .write(&mut icmp, &reply[..28])
            .unwrap();
        let p = parse(&icmp, Link::Ip).unwrap();
        let Kind::IcmpError { quoted, flow } = p.kind else {
            panic!("{:?}", p.kind)
        };
        assert_eq!(quoted, v4_flow(PROTO_TCP, 40000, 80).reversed());
        assert_eq!(quoted.reversed(), v4_flow(PROTO_TCP, 40000, 80));
        assert_eq!(flow.protocol(), PROTO_ICMP);

        let mut reply6 = Vec::new();
        PacketBuilder::ipv6(VIP6, CLIENT6, 64)
            .tcp(443, 40000, 1, 65535)
            .write(&mut reply6, &[0u8; 64])
            .unwrap();
        let mut icmp6 = Vec::new();
        PacketBuilder::ipv6(
            [0x20, 0x01, 0x0d, 0xb8, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            VIP6,
            64,
        )
        .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
        .write(&mut icmp6, &reply6)
        .unwrap();
        let Kind::IcmpError { quoted, .. } = parse(&icmp6, Link::Ip).unwrap().kind else {
            panic!()
        };
        assert_eq!(
            quoted,
            FlowKey::v6(
                Ipv6Addr::from(VIP6),
                Ipv6Addr::from(CLIENT6),
                PROTO_TCP,
                443,
                40000
            )
        );
    }

    #[test]
    fn icmp_echo_is_other_ip() {
        let mut echo = Vec::new();
        PacketBuilder::ipv4(CLIENT, VIP, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut echo, b"ping")
            .unwrap();
        assert_eq!(
            parse(&echo, Link::Ip).unwrap().kind,
            Kind::OtherIp {
                flow: v4_flow(PROTO_ICMP, 0, 0)
            }
        );
    }

    #[test]
    fn an_ip_version_that_is_not_the_ethertypes_is_refused() {
        let v4 = tcp_syn_v4();
        let v6 = udp_v6(b"x");
        for vlans in [0, 1] {
            assert_eq!(
                parse(&ethernet(ETHERTYPE_IPV6, vlans, &v4), Link::Ethernet),
                Err(ParseError::VersionMismatch {
                    ethertype: ETHERTYPE_IPV6,
                    version: 4
                })
            );
            assert_eq!(
                parse(&ethernet(ETHERTYPE_IPV4, vlans, &v6), Link::Ethernet),
                Err(ParseError::VersionMismatch {
                    ethertype: ETHERTYPE_IPV4,
                    version: 6
                })
            );
        }
        // A version that is neither stays malformed; bare IP has no EtherType to disagree with.
        let mut v7 = v4.clone();
        v7[0] = 0x75;
        assert!(matches!(
            parse(&ethernet(ETHERTYPE_IPV4, 0, &v7), Link::Ethernet),
            Err(ParseError::Malformed { layer: Layer::Ip })
        ));
        assert!(parse(&v4, Link::Ip).is_ok() && parse(&v6, Link::Ip).is_ok());
    }

    #[test]
    fn ipv4_options_must_have_lengths_that_fit() {
        let syn = tcp_syn_v4();
        for good in [
            [1, 1, 0, 0],
            [7, 4, 0, 0],
            [0, 7, 0, 0],
            [1, 1, 1, 1],
            [7, 3, 0, 1],
        ] {
            let p = crate::golden::with_options(&syn, &good);
            assert!(parse(&p, Link::Ip).is_ok(), "{good:?}");
        }
        for bad in [
            [7, 0, 0, 0],
            [7, 1, 0, 0],
            [1, 7, 8, 0],
            [1, 1, 1, 7],
            [7, 5, 0, 0],
        ] {
            let p = crate::golden::with_options(&syn, &bad);
            assert_eq!(
                parse(&p, Link::Ip),
                Err(ParseError::BadIpOptions),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_udp_length_other_than_the_payloads_is_refused() {
        let mut udp = Vec::new();
        PacketBuilder::ipv4(CLIENT, VIP, 64)
            .udp(1, 53)
            .write(&mut udp, b"query")
            .unwrap();
        assert!(parse_ipv4_fast(&udp, 0).is_some());
        for length in [0u16, 7, 8, 12] {
            let mut p = udp.clone();
            p[24..26].copy_from_slice(&length.to_be_bytes());
            assert!(parse_ipv4_fast(&p, 0).is_none(), "{length}");
            assert!(parse(&p, Link::Ip).is_err(), "{length}");
        }
        let mut v6 = udp_v6(b"query");
        v6[44..46].copy_from_slice(&0u16.to_be_bytes());
        assert!(parse(&v6, Link::Ip).is_err(), "IPv6 UDP length 0");
    }

    #[test]
    fn the_ttl_is_read_on_both_paths() {
        let mut syn = tcp_syn_v4();
        assert_eq!(parse(&syn, Link::Ip).unwrap().ttl, 64);
        syn[8] = 0;
        fix_checksum(&mut syn);
        assert_eq!(parse_ipv4_fast(&syn, 0).unwrap().ttl, 0);
        assert_eq!(parse_general(&syn, Link::Ip).unwrap().ttl, 0);
        let mut v6 = udp_v6(b"x");
        v6[7] = 0;
        assert_eq!(parse(&v6, Link::Ip).unwrap().ttl, 0);
    }

    #[test]
    fn arp_is_not_ip_and_not_an_error() {
        let frame = ethernet(0x0806, 0, &[0; 28]);
        assert_eq!(
            parse(&frame, Link::Ethernet).unwrap().kind,
            Kind::NotIp { ethertype: 0x0806 }
        );
    }

    #[test]
    fn malformed_input_gives_typed_errors() {
        assert_eq!(
            parse(&[], Link::Ip),
            Err(ParseError::Truncated {
                layer: Layer::Ip,
                required: 1,
                found: 0
            })
        );
        assert!(matches!(
            parse(&[0x45; 10], Link::Ip),
            Err(ParseError::Truncated {
                layer: Layer::Ip,
                ..
            })
        ));
        assert!(matches!(
            parse(&[0x75; 60], Link::Ip),
            Err(ParseError::Malformed { layer: Layer::Ip })
        ));
        assert!(matches!(
            parse(&[0; 13], Link::Ethernet),
            Err(ParseError::Truncated {
                layer: Layer::Ethernet,
                ..
            })
        ));
        let mut short_tcp = tcp_syn_v4();
        short_tcp[32] = 0x20; // TCP data offset 2 words: below the minimum of 5
        assert!(parse(&short_tcp, Link::Ip).is_err());
        // An ICMP error whose quote is cut before the ports.
        let mut icmp = Vec::new();
        PacketBuilder::ipv4([198, 18, 9, 9], VIP, 64)
            .icmpv4(Icmpv4Type::TimeExceeded(
                etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
            ))
            .write(&mut icmp, &tcp_syn_v4()[..22])
            .unwrap();
        assert!(matches!(
            parse(&icmp, Link::Ip),
            Err(ParseError::Truncated {
                layer: Layer::IcmpQuote,
                ..
            })
        ));
    }

    fn valid_frames() -> Vec<(Vec<u8>, Link)> {
        let ip = tcp_syn_v4();
        vec![
            (ip.clone(), Link::Ip),
            (ethernet(ETHERTYPE_IPV4, 1, &ip), Link::Ethernet),
            (udp_v6(b"some payload"), Link::Ip),
            (ethernet(ETHERTYPE_IPV6, 0, &udp_v6(b"x")), Link::Ethernet),
        ]
    }

    /// Rewrites the checksum of the IPv4 header at the start of `ip` (options included).
    fn fix_checksum(ip: &mut [u8]) {
        let header_len = usize::from(ip[0] & 0x0f) * 4;
        ip[10..12].fill(0);
        let mut sum: u32 = ip[..header_len]
            .chunks_exact(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }

    #[test]
    fn the_ipv4_header_checksum_is_verified() {
        let bad = ParseError::BadChecksum { layer: Layer::Ip };
        let good = tcp_syn_v4();
        assert!(ipv4_header_checksum_ok(&good[..20]));
        // Every single-bit error in the header is caught, whichever path would take the frame.
        for bit in 0..160 {
            let mut ip = good.clone();
            ip[bit / 8] ^= 1 << (bit % 8);
            if ip[0] >> 4 != 4 || ip[0] & 0x0f != 5 {
                continue; // no longer a 20-byte IPv4 header: etherparse's to report
            }
            assert!(parse_ipv4_fast(&ip, 0).is_none(), "bit {bit}");
            assert_eq!(parse(&ip, Link::Ip), Err(bad), "bit {bit}");
            let frame = ethernet(ETHERTYPE_IPV4, 1, &ip);
            assert_eq!(parse(&frame, Link::Ethernet), Err(bad), "bit {bit}, VLAN");
        }
        // With options (the general path), the options are covered too.
        let mut header = Ipv4Header::new(8, 64, IpNumber::UDP, CLIENT, VIP).unwrap();
        header.options = [1, 1, 1, 0].as_slice().try_into().unwrap();
        let mut with_options = Vec::new();
        PacketBuilder::ip(etherparse::IpHeaders::Ipv4(header, Default::default()))
            .udp(1000, 53)
            .write(&mut with_options, b"")
            .unwrap();
        assert!(parse(&with_options, Link::Ip).is_ok());
        with_options[21] ^= 1; // an option byte
        assert_eq!(parse(&with_options, Link::Ip), Err(bad));
        fix_checksum(&mut with_options);
        assert!(parse(&with_options, Link::Ip).is_ok());
        // IPv4 has no "checksum absent" value.
        let mut ip = good.clone();
        ip[10..12].fill(0);
        assert_eq!(
            parse(&ip, Link::Ip),
            Err(bad),
            "a zero checksum is not \"no checksum\""
        );
        // IPv6 has no header checksum.
        assert!(parse(&udp_v6(b"x"), Link::Ip).is_ok());
    }

    proptest! {
        /// The multiple-of-0xFFFF test is the RFC 1071 fold, for any header.
        #[test]
        fn checksum_test_is_the_rfc_1071_fold(words in prop::collection::vec(any::<u32>(), 5..=15)) {
            let header: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            let mut sum: u64 = header
                .chunks_exact(2)
                .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
                .sum();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            prop_assert_eq!(ipv4_header_checksum_ok(&header), sum == 0xffff);
            let first: &[u8; 20] = header[..20].try_into().unwrap();
            prop_assert_eq!(ipv4_header20_checksum_ok(first), ipv4_header_checksum_ok(first));
            let mut fixed = header.clone();
            fixed[0] = 0x45;
            fix_checksum(&mut fixed[..20]);
            prop_assert!(ipv4_header_checksum_ok(&fixed[..20]));
        }
    }

    #[test]
    fn checksum_test_edge_cases() {
        assert!(
            !ipv4_header_checksum_ok(&[0; 20]),
            "all zeros sums to 0, not 0xffff"
        );
        assert!(ipv4_header_checksum_ok(&[0xff; 20]), "all ones: 0xffff");
        let mut h = [0u8; 20];
        h[0..2].copy_from_slice(&[0xff, 0xff]);
        assert!(ipv4_header_checksum_ok(&h));
        h[2..4].copy_from_slice(&[0xff, 0xff]);
        assert!(
            ipv4_header_checksum_ok(&h),
            "0xffff + 0xffff folds to 0xffff"
        );
        h[4] = 1;
        assert!(!ipv4_header_checksum_ok(&h));
    }

    #[test]
    fn checksum_errors_rank_after_header_length_errors() {
        // A header cut short is truncated, whatever its checksum bytes say.
        let mut ip = tcp_syn_v4();
        ip[10] ^= 0xff;
        assert!(matches!(
            parse(&ip[..19], Link::Ip),
            Err(ParseError::Truncated { .. })
        ));
        // An IHL below 5 is malformed.
        ip[0] = 0x44;
        assert_eq!(
            parse(&ip, Link::Ip),
            Err(ParseError::Malformed { layer: Layer::Ip })
        );
    }

    #[test]
    fn quoted_headers_in_icmp_errors_are_not_checksummed() {
        // Routers quote what they received, possibly cut short: its checksum is not checked.
        let mut reply = Vec::new();
        PacketBuilder::ipv4(VIP, CLIENT, 64)
            .tcp(80, 40000, 1, 65535)
            .write(&mut reply, &[0u8; 100])
            .unwrap();
        reply[10] ^= 0xff;
        let mut icmp = Vec::new();
        PacketBuilder::ipv4([198, 18, 9, 9], VIP, 64)
            .icmpv4(Icmpv4Type::TimeExceeded(
                etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
            ))
            .write(&mut icmp, &reply[..28])
            .unwrap();
        let Kind::IcmpError { quoted, .. } = parse(&icmp, Link::Ip).unwrap().kind else {
            panic!()
        };
        assert_eq!(quoted, v4_flow(PROTO_TCP, 40000, 80).reversed());
    }

    #[test]
    fn every_truncation_of_a_valid_frame_is_an_error() {
        for (frame, link) in valid_frames() {
            parse(&frame, link).unwrap();
            for len in 0..frame.len() {
                assert!(
                    parse(&frame[..len], link).is_err(),
                    "prefix of {len} bytes of {frame:02x?} parsed"
                );
            }
        }
    }

    /// Where the fast path answers, the general path must answer the same.
    fn assert_paths_agree(frame: &[u8]) {
        for (link, offset) in [(Link::Ip, 0), (Link::Ethernet, 14)] {
            if let Some(fast) = parse_ipv4_fast(frame, offset) {
                if link == Link::Ethernet && frame.get(12..14) != Some(&[0x08, 0x00][..]) {
                    continue;
                }
                assert_eq!(Ok(fast), parse_general(frame, link), "{frame:02x?}");
            }
        }
    }

    #[test]
    fn fast_path_takes_plain_tcp_and_udp_and_agrees() {
        let syn = tcp_syn_v4();
        assert!(parse_ipv4_fast(&syn, 0).is_some());
        let mut udp = Vec::new();
        PacketBuilder::ipv4(CLIENT, VIP, 64)
            .udp(1, 2)
            .write(&mut udp, b"x")
            .unwrap();
        assert!(parse_ipv4_fast(&udp, 0).is_some());
        assert!(parse_ipv4_fast(&ethernet(ETHERTYPE_IPV4, 0, &syn), 14).is_some());
        for f in [syn, udp] {
            assert_paths_agree(&f);
        }
    }

    proptest! {
        #[test]
        fn fast_path_agrees_with_etherparse_on_mutations(which in 0usize..4, at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let (mut frame, _) = valid_frames().swap_remove(which);
            let at = at.index(frame.len());
            frame[at] = byte;
            assert_paths_agree(&frame);
        }

        #[test]
        fn fast_path_agrees_with_etherparse_on_tcp_and_udp(
            sport in any::<u16>(), dport in any::<u16>(), payload in prop::collection::vec(any::<u8>(), 0..64),
            udp in any::<bool>(), flags in any::<u8>(), df in any::<bool>(),
        ) {
            let mut out = Vec::new();
            let b = PacketBuilder::ipv4(CLIENT, VIP, 64);
            if udp {
                b.udp(sport, dport).write(&mut out, &payload).unwrap();
            } else {
                b.tcp(sport, dport, 1, 1000).write(&mut out, &payload).unwrap();
                out[33] = flags;
            }
            out[6] = if df { 0x40 } else { 0 };
            fix_checksum(&mut out);
            prop_assert!(parse_ipv4_fast(&out, 0).is_some());
            assert_paths_agree(&out);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes, Link::Ip);
            let _ = parse(&bytes, Link::Ethernet);
        }

        #[test]
        fn mutated_valid_frames_never_panic(which in 0usize..4, at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let (mut frame, link) = valid_frames().swap_remove(which);
            let at = at.index(frame.len());
            frame[at] = byte;
            let _ = parse(&frame, link);
        }
    }
}
