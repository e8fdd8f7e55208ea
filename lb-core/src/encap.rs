//! Encapsulation towards the backends (IP-in-IP, GRE) and the matching decapsulation.
//!
//! The mux forwards a client packet to its backend by putting a new outer IP header (and, for GRE,
//! a GRE header) in front of it; the backend agent strips it again with [`decapsulate`]. Both are
//! pure functions over byte slices: [`encapsulate`] writes into a caller's buffer and neither
//! function allocates.
//!
//! Invariant: the inner packet's bytes are never modified, only copied behind the new headers, and
//! every header [`encapsulate`] emits carries correct lengths and (for IPv4) a correct header
//! checksum. [`decapsulate`] returns a sub-slice of its input, bounded by the outer length fields,
//! and never panics: every malformed input is a typed [`DecapError`].
//!
//! Formats, and the RFC each follows:
//!
//! | outer | inner | outer protocol / next header | RFC |
//! | --- | --- | --- | --- |
//! | IPv4 | IPv4 | 4 | RFC 2003 (IP-in-IP) |
//! | IPv4 | IPv6 | 41 | RFC 4213 §3.5 (IPv6-in-IPv4) |
//! | IPv6 | IPv4 or IPv6 | 4 or 41 | RFC 2473 (generic IPv6 tunnels) |
//! | IPv4 or IPv6 | IPv4 or IPv6 | 47, GRE | RFC 2784, key extension RFC 2890 |
//!
//! Outer header fields that [`encapsulate`] writes:
//!
//! - DSCP and ECN are copied from the inner packet (IPv4 TOS, IPv6 traffic class): DSCP so the
//!   network between mux and backend keeps the client's class of service, ECN as in RFC 6040
//!   normal mode, so congestion marks set on the tunnel reach the backend.
//! - IPv4: IHL 5 (no options), DF set, identification 0. RFC 6864 §4.1 allows any ID, 0 included,
//!   on an atomic datagram (DF set, not a fragment), and DF is always set here: the mux never
//!   fragments, it answers with ICMP "fragmentation needed" instead.
//! - IPv6: flow label 0. The outer addresses are fixed per backend, so a derived label (RFC 6438)
//!   would only spread one backend's traffic over ECMP paths; that is left for later, and 0 keeps
//!   the output a function of the inner packet's DSCP/ECN and the parameters alone.
//! - TTL / hop limit is [`EncapParams::ttl`]; it is not derived from the inner TTL.
//! - GRE: no checksum, no sequence number; the K bit and key only when a key is configured.
//!
//! [`decapsulate`] accepts more than it emits: outer IPv4 options, and GRE with a checksum (which is
//! verified) or a sequence number (which is skipped). It rejects outer IPv4 fragments, outer IPv6
//! extension headers, GRE routing (RFC 1701) and any GRE version other than 0.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

// GRE's protocol type field holds an EtherType (RFC 2784 §2.4).
use crate::packet::{ETHERTYPE_IPV4, ETHERTYPE_IPV6};

/// Length of an IPv4 header without options.
pub const IPV4_HEADER_LEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;
/// Length of the base GRE header: flags and version, protocol type (RFC 2784).
pub const GRE_HEADER_LEN: usize = 4;
/// Length of the optional GRE key field (RFC 2890).
pub const GRE_KEY_LEN: usize = 4;

/// IP protocol number of IPv4-in-IP encapsulation (RFC 2003).
pub const PROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6 encapsulation (RFC 2473, RFC 4213).
pub const PROTO_IPV6: u8 = 41;
/// IP protocol number of GRE (RFC 2784).
pub const PROTO_GRE: u8 = 47;

/// GRE checksum-present bit (C, bit 0).
const GRE_FLAG_C: u16 = 0x8000;
/// GRE routing-present bit (R, bit 1, RFC 1701 only).
const GRE_FLAG_R: u16 = 0x4000;
/// GRE key-present bit (K, bit 2, RFC 2890).
const GRE_FLAG_K: u16 = 0x2000;
/// GRE sequence-number-present bit (S, bit 3, RFC 2890).
const GRE_FLAG_S: u16 = 0x1000;
/// Bits 4 and 5 (RFC 1701 strict source route and top recursion bit): RFC 2784 §2.3 says to discard
/// a packet that sets them. Bits 6-12 are ignored on receipt.
const GRE_FLAGS_RESERVED: u16 = 0x0C00;
/// GRE version field (bits 13-15).
const GRE_VERSION_MASK: u16 = 0x0007;

/// IPv4 flags and fragment offset with only DF set.
const IPV4_DF: u16 = 0x4000;
/// IPv4 MF flag and fragment offset: non-zero on any fragment.
const IPV4_FRAGMENT_MASK: u16 = 0x3FFF;

/// The tunnel format towards a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EncapKind {
    /// Plain IP-in-IP: outer protocol 4 for an IPv4 inner packet, 41 for IPv6.
    Ipip,
    /// GRE (protocol 47), with the RFC 2890 key when `key` is `Some`.
    Gre {
        /// The GRE key; `None` sends no key field.
        key: Option<u32>,
    },
}

/// Everything [`encapsulate`] needs besides the inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EncapParams {
    /// Outer source: the mux's address. Same family as `outer_dst`.
    pub outer_src: IpAddr,
    /// Outer destination: the backend's address. Same family as `outer_src`.
    pub outer_dst: IpAddr,
    /// Outer IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// The tunnel format.
    pub kind: EncapKind,
}

/// Why [`encapsulate`] wrote nothing. Each variant maps to a drop reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncapError {
    /// `out` cannot hold the outer headers plus the inner packet.
    #[error(
        "output buffer too small: encapsulated packet needs {needed} bytes, {available} available"
    )]
    BufferTooSmall {
        /// Length of the encapsulated packet.
        needed: usize,
        /// Length of the caller's buffer.
        available: usize,
    },
    /// The inner packet is empty.
    #[error("inner packet is empty")]
    InnerEmpty,
    /// The inner packet's version nibble is neither 4 nor 6.
    #[error("inner packet is not IPv4 or IPv6 (version nibble {version})")]
    InnerNotIp {
        /// The version nibble found.
        version: u8,
    },
    /// The inner packet is shorter than its fixed IP header.
    #[error("inner IPv{version} packet is {found} bytes, shorter than its {needed}-byte header")]
    InnerTooShort {
        /// 4 or 6.
        version: u8,
        /// Length of the fixed header: 20 or 40.
        needed: usize,
        /// Length of the inner packet.
        found: usize,
    },
    /// `outer_src` and `outer_dst` are of different families.
    #[error("outer source {src} and outer destination {dst} are of different IP families")]
    FamilyMismatch {
        /// The outer source asked for.
        src: IpAddr,
        /// The outer destination asked for.
        dst: IpAddr,
    },
    /// The outer IPv4 total length or IPv6 payload length would exceed 65535.
    #[error("encapsulated {field} would be {length} bytes, more than 65535")]
    TooLong {
        /// `"IPv4 total length"` or `"IPv6 payload length"`.
        field: &'static str,
        /// The length it would have.
        length: usize,
    },
}

/// The header at which [`decapsulate`] found a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecapLayer {
    /// The outer IPv4 or IPv6 header.
    OuterIp,
    /// The GRE header.
    Gre,
    /// The inner packet.
    Inner,
}

impl std::fmt::Display for DecapLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::OuterIp => "outer IP header",
            Self::Gre => "GRE header",
            Self::Inner => "inner packet",
        })
    }
}

/// Why [`decapsulate`] rejected a packet. Each variant maps to a drop reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecapError {
    /// A header, or the length the outer header declares, runs past the end of the data.
    #[error("{layer} truncated: needs {needed} bytes, {found} present")]
    Truncated {
        /// Where the data ran out.
        layer: DecapLayer,
        /// Bytes required from the start of that layer.
        needed: usize,
        /// Bytes present from the start of that layer.
        found: usize,
    },
    /// The outer version nibble is neither 4 nor 6.
    #[error("outer packet is not IPv4 or IPv6 (version nibble {version})")]
    OuterNotIp {
        /// The version nibble found.
        version: u8,
    },
    /// The outer IPv4 IHL is below 5.
    #[error("outer IPv4 IHL {ihl} is below the minimum of 5")]
    OuterBadIhl {
        /// The IHL found, in 32-bit words.
        ihl: u8,
    },
    /// The outer IPv4 total length is smaller than the header itself.
    #[error("outer IPv4 total length {total_len} is smaller than its {header_len}-byte header")]
    OuterBadTotalLen {
        /// The total length field.
        total_len: u16,
        /// The header length from the IHL.
        header_len: usize,
    },
    /// The outer IPv4 header checksum is wrong.
    #[error("outer IPv4 header checksum {found:#06x} is wrong (expected {expected:#06x})")]
    OuterChecksum {
        /// The checksum in the header.
        found: u16,
        /// The checksum the header should carry.
        expected: u16,
    },
    /// The outer IPv4 packet is a fragment; reassembly is not done here.
    #[error("outer IPv4 packet is a fragment; tunnel packets must not be fragmented")]
    OuterFragment,
    /// The outer protocol (IPv4) or next header (IPv6) is not 4, 41 or 47.
    #[error("outer protocol/next header {protocol} is not IP-in-IP (4), IPv6 (41) or GRE (47)")]
    UnsupportedProtocol {
        /// The protocol or next header found.
        protocol: u8,
    },
    /// The GRE version is not 0 (version 1 is PPTP).
    #[error("GRE version {version} is not supported (only version 0)")]
    GreVersion {
        /// The version found.
        version: u8,
    },
    /// The GRE routing bit (RFC 1701) is set.
    #[error("GRE routing (R bit, RFC 1701) is not supported")]
    GreRouting,
    /// GRE flag bits 4 or 5 are set, which RFC 2784 §2.3 says to discard.
    #[error("GRE flags {flags:#06x} set reserved bits 4-5 (RFC 2784 section 2.3)")]
    GreReservedFlags {
        /// The whole flags-and-version word.
        flags: u16,
    },
    /// The GRE checksum does not match the GRE header and payload.
    #[error("GRE checksum is wrong")]
    GreChecksum,
    /// The GRE protocol type is neither IPv4 (0x0800) nor IPv6 (0x86DD).
    #[error("GRE protocol type {protocol_type:#06x} is neither IPv4 (0x0800) nor IPv6 (0x86dd)")]
    GreProtocol {
        /// The protocol type found.
        protocol_type: u16,
    },
    /// The inner version nibble differs from the one the outer protocol or GRE type announces.
    #[error("inner packet has version {found}, but the tunnel header announces IPv{expected}")]
    InnerVersionMismatch {
        /// 4 or 6, from the outer protocol or the GRE protocol type.
        expected: u8,
        /// The inner version nibble.
        found: u8,
    },
}

/// A decapsulated packet: the outer addresses, the GRE key and the inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decapsulated<'a> {
    /// Outer source address (the mux).
    pub outer_src: IpAddr,
    /// Outer destination address (this backend).
    pub outer_dst: IpAddr,
    /// The GRE key, when the packet was GRE with the K bit set.
    pub gre_key: Option<u32>,
    /// The inner IP packet, bounded by the outer length fields; at least its fixed header long,
    /// with the version the tunnel header announced.
    pub inner: &'a [u8],
}

/// The bytes [`encapsulate`] puts in front of the inner packet: 20 or 40 for the outer IP header,
/// plus 4 for GRE, plus 4 for a GRE key.
#[must_use]
pub const fn overhead(kind: EncapKind, outer_is_v6: bool) -> usize {
    let ip = if outer_is_v6 {
        IPV6_HEADER_LEN
    } else {
        IPV4_HEADER_LEN
    };
    ip + gre_len(kind)
}

/// Length of the GRE header [`encapsulate`] writes for `kind` (0 for IP-in-IP).
const fn gre_len(kind: EncapKind) -> usize {
    match kind {
        EncapKind::Ipip => 0,
        EncapKind::Gre { key: None } => GRE_HEADER_LEN,
        EncapKind::Gre { key: Some(_) } => GRE_HEADER_LEN + GRE_KEY_LEN,
    }
}

/// The longest header [`encapsulate`] writes: IPv6, GRE and a GRE key.
pub const MAX_OVERHEAD: usize = IPV6_HEADER_LEN + GRE_HEADER_LEN + GRE_KEY_LEN;

/// Writes the outer header (and GRE header) followed by `inner`, unchanged, into `out`, and
/// returns the length written. `out` beyond that length is left untouched.
///
/// `inner` is an IPv4 or IPv6 packet, told apart by its first nibble; only its fixed header is
/// read (for the version and DSCP/ECN). The header fields written are listed in the module docs.
///
/// This builds a [`Tunnel`] and uses it once; a caller that sends to the same backend again
/// keeps the [`Tunnel`] instead (the forwarding decision keeps one per backend).
///
/// # Errors
///
/// [`EncapError`] when the outer addresses differ in family, `inner` is not IPv4/IPv6 or is
/// shorter than its fixed header, the outer length field would overflow, or `out` is too small.
/// Nothing is written on error.
pub fn encapsulate(
    inner: &[u8],
    params: &EncapParams,
    out: &mut [u8],
) -> Result<usize, EncapError> {
    Tunnel::new(*params)?.encapsulate(inner, out)
}

/// The outer headers towards one backend, built once from its [`EncapParams`], so that each
/// packet only fills in what depends on it: the DSCP/ECN byte, the length and, for IPv4, the
/// checksum (the template's sum plus those two fields, RFC 1624's incremental update). The
/// packets are byte for byte those of the [`encapsulate`] it implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tunnel {
    params: EncapParams,
    /// The outer IP and GRE headers for an IPv4 inner packet (`[0]`) and an IPv6 one (`[1]`),
    /// with DSCP/ECN, length and checksum 0.
    templates: [[u8; MAX_OVERHEAD]; 2],
    /// The word sums of the IPv4 templates' outer headers (0 for IPv6).
    sums: [u32; 2],
    /// 20 or 40.
    ip_len: u8,
    /// 0, 4 or 8.
    gre_len: u8,
}

impl Tunnel {
    /// The tunnel of `params`.
    ///
    /// # Errors
    ///
    /// [`EncapError::FamilyMismatch`] when the outer addresses differ in family.
    pub fn new(params: EncapParams) -> Result<Self, EncapError> {
        let outer = match (params.outer_src, params.outer_dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => Outer::V4(src, dst),
            (IpAddr::V6(src), IpAddr::V6(dst)) => Outer::V6(src, dst),
            (src, dst) => return Err(EncapError::FamilyMismatch { src, dst }),
        };
        let outer_is_v6 = matches!(outer, Outer::V6(..));
        let ip_len = overhead(EncapKind::Ipip, outer_is_v6);
        let gre_len = gre_len(params.kind);
        let mut templates = [[0u8; MAX_OVERHEAD]; 2];
        let mut sums = [0u32; 2];
        for (inner_is_v6, (t, sum)) in [false, true]
            .into_iter()
            .zip(templates.iter_mut().zip(&mut sums))
        {
            let (ip, gre) = t.split_at_mut(ip_len);
            let protocol = match (params.kind, inner_is_v6) {
                (EncapKind::Gre { .. }, _) => PROTO_GRE,
                (EncapKind::Ipip, false) => PROTO_IPIP,
                (EncapKind::Ipip, true) => PROTO_IPV6,
            };
            match outer {
                Outer::V4(src, dst) => {
                    write_ipv4(ip, src, dst, 0, 0, params.ttl, protocol);
                    ip[10..12].fill(0);
                    // Ten words: far below u32::MAX.
                    *sum = word_sum(ip) as u32;
                }
                Outer::V6(src, dst) => write_ipv6(ip, src, dst, 0, 0, params.ttl, protocol),
            }
            if let EncapKind::Gre { key } = params.kind {
                let flags = if key.is_some() { GRE_FLAG_K } else { 0 };
                let protocol_type = if inner_is_v6 {
                    ETHERTYPE_IPV6
                } else {
                    ETHERTYPE_IPV4
                };
                gre[0..2].copy_from_slice(&flags.to_be_bytes());
                gre[2..4].copy_from_slice(&protocol_type.to_be_bytes());
                if let Some(key) = key {
                    gre[4..8].copy_from_slice(&key.to_be_bytes());
                }
            }
        }
        Ok(Self {
            params,
            templates,
            sums,
            // 20 or 40, and 0, 4 or 8.
            ip_len: ip_len as u8,
            gre_len: gre_len as u8,
        })
    }

    /// The parameters it was built from.
    #[must_use]
    pub fn params(&self) -> &EncapParams {
        &self.params
    }

    /// The bytes it puts in front of a packet: [`overhead`] of its parameters.
    #[inline]
    #[must_use]
    pub fn overhead(&self) -> usize {
        usize::from(self.ip_len) + usize::from(self.gre_len)
    }

    /// [`encapsulate`] with this tunnel's parameters: the same bytes, the same errors (but
    /// [`EncapError::FamilyMismatch`], which [`Self::new`] reports), the same guarantees.
    ///
    /// # Errors
    ///
    /// As [`encapsulate`].
    #[inline]
    pub fn encapsulate(&self, inner: &[u8], out: &mut [u8]) -> Result<usize, EncapError> {
        let (inner_is_v6, tos) = inner_version_and_tos(inner)?;
        let template = &self.templates[usize::from(inner_is_v6)];
        let header_len = self.overhead();
        let total = header_len.saturating_add(inner.len());
        let outer_is_v6 = usize::from(self.ip_len) == IPV6_HEADER_LEN;
        let length_field = if outer_is_v6 {
            total - IPV6_HEADER_LEN
        } else {
            total
        };
        let Ok(length_field) = u16::try_from(length_field) else {
            let field = if outer_is_v6 {
                "IPv6 payload length"
            } else {
                "IPv4 total length"
            };
            return Err(EncapError::TooLong {
                field,
                length: length_field,
            });
        };
        let Some(out) = out.get_mut(..total) else {
            return Err(EncapError::BufferTooSmall {
                needed: total,
                available: out.len(),
            });
        };
        // Fixed-size writes: one per header, no length-generic copy.
        let [len_hi, len_lo] = length_field.to_be_bytes();
        if outer_is_v6 {
            let mut h = [0u8; IPV6_HEADER_LEN];
            h.copy_from_slice(&template[..IPV6_HEADER_LEN]);
            h[0] |= tos >> 4;
            h[1] = tos << 4;
            h[4] = len_hi;
            h[5] = len_lo;
            out[..IPV6_HEADER_LEN].copy_from_slice(&h);
        } else {
            let mut h = [0u8; IPV4_HEADER_LEN];
            h.copy_from_slice(&template[..IPV4_HEADER_LEN]);
            h[1] = tos;
            h[2] = len_hi;
            h[3] = len_lo;
            // Word 0 is 0x45 then the TOS, word 1 the total length: add them to the sum.
            let sum =
                self.sums[usize::from(inner_is_v6)] + u32::from(tos) + u32::from(length_field);
            let checksum = !fold(u64::from(sum));
            h[10..12].copy_from_slice(&checksum.to_be_bytes());
            out[..IPV4_HEADER_LEN].copy_from_slice(&h);
        }
        let ip_len = usize::from(self.ip_len);
        match self.gre_len {
            0 => {}
            4 => out[ip_len..ip_len + 4].copy_from_slice(&template[ip_len..ip_len + 4]),
            _ => out[ip_len..ip_len + 8].copy_from_slice(&template[ip_len..ip_len + 8]),
        }
        out[header_len..].copy_from_slice(inner);
        Ok(total)
    }
}

/// The outer addresses, checked to be of one family.
#[derive(Clone, Copy)]
enum Outer {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

/// The inner packet's family (`true` for IPv6) and its DSCP/ECN byte (IPv4 TOS or IPv6 traffic
/// class), after checking it is at least its fixed header long.
fn inner_version_and_tos(inner: &[u8]) -> Result<(bool, u8), EncapError> {
    let Some(&first) = inner.first() else {
        return Err(EncapError::InnerEmpty);
    };
    let (is_v6, needed) = match first >> 4 {
        4 => (false, IPV4_HEADER_LEN),
        6 => (true, IPV6_HEADER_LEN),
        version => return Err(EncapError::InnerNotIp { version }),
    };
    if inner.len() < needed {
        return Err(EncapError::InnerTooShort {
            version: first >> 4,
            needed,
            found: inner.len(),
        });
    }
    let tos = if is_v6 {
        (first << 4) | (inner[1] >> 4)
    } else {
        inner[1]
    };
    Ok((is_v6, tos))
}

/// Writes a 20-byte IPv4 header (no options, DF, ID 0) with its checksum into `h`.
fn write_ipv4(
    h: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    tos: u8,
    total_len: u16,
    ttl: u8,
    protocol: u8,
) {
    h[0] = 0x45;
    h[1] = tos;
    h[2..4].copy_from_slice(&total_len.to_be_bytes());
    h[4..6].copy_from_slice(&0u16.to_be_bytes());
    h[6..8].copy_from_slice(&IPV4_DF.to_be_bytes());
    h[8] = ttl;
    h[9] = protocol;
    h[10..12].copy_from_slice(&0u16.to_be_bytes());
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let checksum = !ones_complement_sum(&h[..IPV4_HEADER_LEN]);
    h[10..12].copy_from_slice(&checksum.to_be_bytes());
}

/// Writes a 40-byte IPv6 header (flow label 0) into `h`.
fn write_ipv6(
    h: &mut [u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    traffic_class: u8,
    payload_len: u16,
    hop_limit: u8,
    next_header: u8,
) {
    h[0] = 0x60 | (traffic_class >> 4);
    h[1] = traffic_class << 4;
    h[2..4].copy_from_slice(&0u16.to_be_bytes());
    h[4..6].copy_from_slice(&payload_len.to_be_bytes());
    h[6] = next_header;
    h[7] = hop_limit;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
}

/// The folded 16-bit one's complement sum of `data` (RFC 1071), an odd last byte padded with
/// zero. A header with a correct checksum sums to `0xFFFF`.
fn ones_complement_sum(data: &[u8]) -> u16 {
    fold(word_sum(data))
}

/// The plain sum of the big-endian 16-bit words of `data`, an odd last byte padded with zero.
/// A `u64` cannot overflow for any slice that fits in memory.
fn word_sum(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    let mut sum: u64 = chunks
        .by_ref()
        .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds the carries of a word sum back in (end-around carry) to 16 bits.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    // The loop leaves sum <= 0xFFFF.
    u16::try_from(sum).unwrap_or(u16::MAX)
}

/// The big-endian `u16` at `at`; the caller has checked `at + 2 <= b.len()`.
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Strips the outer IP header (and GRE header) of a tunnelled packet.
///
/// `packet` starts at the outer IPv4 or IPv6 header. Bytes beyond the outer total length (IPv4) or
/// payload length (IPv6), such as Ethernet padding, are ignored. The formats accepted are listed
/// in the module docs.
///
/// # Errors
///
/// [`DecapError`] for anything that is not a well-formed tunnel packet of a supported kind; see
/// its variants. No input panics.
pub fn decapsulate(packet: &[u8]) -> Result<Decapsulated<'_>, DecapError> {
    let Some(&first) = packet.first() else {
        return Err(truncated(DecapLayer::OuterIp, 1, 0));
    };
    let (outer_src, outer_dst, protocol, payload) = match first >> 4 {
        4 => outer_ipv4(packet)?,
        6 => outer_ipv6(packet)?,
        version => return Err(DecapError::OuterNotIp { version }),
    };
    let (expected, gre_key, inner) = match protocol {
        PROTO_IPIP => (4, None, payload),
        PROTO_IPV6 => (6, None, payload),
        PROTO_GRE => gre(payload)?,
        protocol => return Err(DecapError::UnsupportedProtocol { protocol }),
    };
    let Some(&inner_first) = inner.first() else {
        return Err(truncated(DecapLayer::Inner, 1, 0));
    };
    let found = inner_first >> 4;
    if found != expected {
        return Err(DecapError::InnerVersionMismatch { expected, found });
    }
    let needed = if expected == 4 {
        IPV4_HEADER_LEN
    } else {
        IPV6_HEADER_LEN
    };
    if inner.len() < needed {
        return Err(truncated(DecapLayer::Inner, needed, inner.len()));
    }
    Ok(Decapsulated {
        outer_src,
        outer_dst,
        gre_key,
        inner,
    })
}

const fn truncated(layer: DecapLayer, needed: usize, found: usize) -> DecapError {
    DecapError::Truncated {
        layer,
        needed,
        found,
    }
}

/// Source, destination, protocol and payload (bounded by the total length) of an outer IPv4
/// packet.
fn outer_ipv4(packet: &[u8]) -> Result<(IpAddr, IpAddr, u8, &[u8]), DecapError> {
    if packet.len() < IPV4_HEADER_LEN {
        return Err(truncated(
            DecapLayer::OuterIp,
            IPV4_HEADER_LEN,
            packet.len(),
        ));
    }
    let ihl = packet[0] & 0x0F;
    if ihl < 5 {
        return Err(DecapError::OuterBadIhl { ihl });
    }
    let header_len = usize::from(ihl) * 4;
    let total_len = be16(packet, 2);
    let Some(header) = packet.get(..header_len) else {
        return Err(truncated(DecapLayer::OuterIp, header_len, packet.len()));
    };
    if usize::from(total_len) < header_len {
        return Err(DecapError::OuterBadTotalLen {
            total_len,
            header_len,
        });
    }
    let Some(datagram) = packet.get(..usize::from(total_len)) else {
        return Err(truncated(
            DecapLayer::OuterIp,
            usize::from(total_len),
            packet.len(),
        ));
    };
    if ones_complement_sum(header) != 0xFFFF {
        // One's complement addition is associative: sum the header around the checksum field.
        let without_checksum = fold(word_sum(&header[..10]) + word_sum(&header[12..]));
        return Err(DecapError::OuterChecksum {
            found: be16(header, 10),
            expected: !without_checksum,
        });
    }
    if be16(header, 6) & IPV4_FRAGMENT_MASK != 0 {
        return Err(DecapError::OuterFragment);
    }
    let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    Ok((
        IpAddr::V4(src),
        IpAddr::V4(dst),
        header[9],
        &datagram[header_len..],
    ))
}

/// Source, destination, next header and payload (bounded by the payload length) of an outer IPv6
/// packet.
fn outer_ipv6(packet: &[u8]) -> Result<(IpAddr, IpAddr, u8, &[u8]), DecapError> {
    if packet.len() < IPV6_HEADER_LEN {
        return Err(truncated(
            DecapLayer::OuterIp,
            IPV6_HEADER_LEN,
            packet.len(),
        ));
    }
    let total = IPV6_HEADER_LEN + usize::from(be16(packet, 4));
    let Some(datagram) = packet.get(..total) else {
        return Err(truncated(DecapLayer::OuterIp, total, packet.len()));
    };
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&datagram[8..24]);
    dst.copy_from_slice(&datagram[24..40]);
    Ok((
        IpAddr::V6(Ipv6Addr::from(src)),
        IpAddr::V6(Ipv6Addr::from(dst)),
        datagram[6],
        &datagram[IPV6_HEADER_LEN..],
    ))
}

/// The announced inner version, the key and the payload of a GRE packet (RFC 2784, RFC 2890).
fn gre(packet: &[u8]) -> Result<(u8, Option<u32>, &[u8]), DecapError> {
    if packet.len() < GRE_HEADER_LEN {
        return Err(truncated(DecapLayer::Gre, GRE_HEADER_LEN, packet.len()));
    }
    let flags = be16(packet, 0);
    let [_, version] = (flags & GRE_VERSION_MASK).to_be_bytes();
    if version != 0 {
        return Err(DecapError::GreVersion { version });
    }
    if flags & GRE_FLAG_R != 0 {
        return Err(DecapError::GreRouting);
    }
    if flags & GRE_FLAGS_RESERVED != 0 {
        return Err(DecapError::GreReservedFlags { flags });
    }
    let has_checksum = flags & GRE_FLAG_C != 0;
    let has_key = flags & GRE_FLAG_K != 0;
    let has_sequence = flags & GRE_FLAG_S != 0;
    let header_len = GRE_HEADER_LEN
        + 4 * (usize::from(has_checksum) + usize::from(has_key) + usize::from(has_sequence));
    if packet.len() < header_len {
        return Err(truncated(DecapLayer::Gre, header_len, packet.len()));
    }
    // The checksum covers the GRE header and the payload (RFC 2784 §2.5).
    if has_checksum && ones_complement_sum(packet) != 0xFFFF {
        return Err(DecapError::GreChecksum);
    }
    let key_at = GRE_HEADER_LEN + 4 * usize::from(has_checksum);
    let key = has_key.then(|| {
        u32::from_be_bytes([
            packet[key_at],
            packet[key_at + 1],
            packet[key_at + 2],
            packet[key_at + 3],
        ])
    });
    let expected = match be16(packet, 2) {
        ETHERTYPE_IPV4 => 4,
        ETHERTYPE_IPV6 => 6,
        protocol_type => return Err(DecapError::GreProtocol { protocol_type }),
    };
    Ok((expected, key, &packet[header_len..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{
        IpDscp, IpEcn, IpHeaders, IpNumber, Ipv4Header, Ipv4HeaderSlice, Ipv6FlowLabel, Ipv6Header,
        Ipv6HeaderSlice, PacketBuilder,
    };
    use proptest::prelude::*;

    /// Bytes from a hex string; whitespace is ignored.
    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| {
                let pair = std::str::from_utf8(pair).expect("ascii");
                u8::from_str_radix(pair, 16).expect("hex digit pair")
            })
            .collect()
    }

    fn to_hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The inner fields the property tests vary.
    #[derive(Debug, Clone)]
    struct InnerSpec {
        v6: bool,
        tcp: bool,
        src: [u8; 16],
        dst: [u8; 16],
        dscp: u8,
        ecn: u8,
        flow_label: u32,
        src_port: u16,
        dst_port: u16,
        payload: Vec<u8>,
    }

    /// A real IPv4 or IPv6 TCP SYN or UDP packet, built (with checksums) by etherparse.
    fn build_inner(spec: &InnerSpec) -> Vec<u8> {
        let ip = if spec.v6 {
            let header = Ipv6Header {
                traffic_class: (spec.dscp << 2) | spec.ecn,
                flow_label: Ipv6FlowLabel::try_new(spec.flow_label).expect("20-bit label"),
                payload_length: 0,
                next_header: IpNumber::UDP,
                hop_limit: 64,
                source: spec.src,
                destination: spec.dst,
            };
            IpHeaders::Ipv6(header, Default::default())
        } else {
            let src = [spec.src[0], spec.src[1], spec.src[2], spec.src[3]];
            let dst = [spec.dst[0], spec.dst[1], spec.dst[2], spec.dst[3]];
            let mut header = Ipv4Header::new(0, 64, IpNumber::TCP, src, dst).expect("header");
            header.dscp = IpDscp::try_new(spec.dscp).expect("6-bit DSCP");
            header.ecn = IpEcn::try_new(spec.ecn).expect("2-bit ECN");
            header.dont_fragment = true;
            IpHeaders::Ipv4(header, Default::default())
        };
        let mut packet = Vec::new();
        let builder = PacketBuilder::ip(ip);
        if spec.tcp {
            builder
                .tcp(spec.src_port, spec.dst_port, 0x0102_0304, 64240)
                .syn()
                .write_to_vec(&mut packet, &spec.payload)
                .expect("build TCP packet");
        } else {
            builder
                .udp(spec.src_port, spec.dst_port)
                .write_to_vec(&mut packet, &spec.payload)
                .expect("build UDP packet");
        }
        packet
    }

    /// 10.0.0.1:40000 -> 192.0.2.10:80, TCP SYN, DSCP 46 (EF), ECN ECT(0).
    fn ipv4_tcp_syn() -> Vec<u8> {
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src[..4].copy_from_slice(&[10, 0, 0, 1]);
        dst[..4].copy_from_slice(&[192, 0, 2, 10]);
        build_inner(&InnerSpec {
            v6: false,
            tcp: true,
            src,
            dst,
            dscp: 46,
            ecn: 2,
            flow_label: 0,
            src_port: 40000,
            dst_port: 80,
            payload: Vec::new(),
        })
    }

    /// [2001:db8::1]:5353 -> [2001:db8::10]:53, UDP "hello", DSCP 10 (AF11), ECN ECT(1), flow label
    /// 0x12345.
    fn ipv6_udp() -> Vec<u8> {
        build_inner(&InnerSpec {
            v6: true,
            tcp: false,
            src: "2001:db8::1".parse::<Ipv6Addr>().expect("addr").octets(),
            dst: "2001:db8::10".parse::<Ipv6Addr>().expect("addr").octets(),
            dscp: 10,
            ecn: 1,
            flow_label: 0x12345,
            src_port: 5353,
            dst_port: 53,
            payload: b"hello".to_vec(),
        })
    }

    /// The inner packets of the golden table, pinned so a change in etherparse cannot move them.
    const INNER_V4_HEX: &str =
        "45ba00280000400040066e0b0a000001c000020a9c40005001020304000000005002faf048500000";
    const INNER_V6_HEX: &str = "62912345000d114020010db800000000000000000000000120010db800000000000000000000001014e90035000d4b6168656c6c6f";

    #[test]
    fn golden_inner_packets_are_pinned() {
        assert_eq!(to_hex(&ipv4_tcp_syn()), INNER_V4_HEX);
        assert_eq!(to_hex(&ipv6_udp()), INNER_V6_HEX);
    }

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().expect("IPv4 address"))
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().expect("IPv6 address"))
    }

    fn params(outer_v6: bool, kind: EncapKind) -> EncapParams {
        let (outer_src, outer_dst) = if outer_v6 {
            (v6("2001:db8:100::1"), v6("2001:db8:200::7"))
        } else {
            (v4("198.51.100.1"), v4("203.0.113.7"))
        };
        EncapParams {
            outer_src,
            outer_dst,
            ttl: 64,
            kind,
        }
    }

    struct Golden {
        description: &'static str,
        inner_v6: bool,
        params: EncapParams,
        /// The outer IP header and GRE header; the expected output is these bytes followed by
        /// the inner packet, unchanged.
        expected_headers: &'static str,
    }

    fn golden_table() -> Vec<Golden> {
        const KEY: EncapKind = EncapKind::Gre {
            key: Some(0xdead_beef),
        };
        const NO_KEY: EncapKind = EncapKind::Gre { key: None };
        let case = |description, inner_v6, outer_v6, kind, expected_headers| Golden {
            description,
            inner_v6,
            params: params(outer_v6, kind),
            expected_headers,
        };
        vec![
            case(
                "IPv4 in IPv4 (RFC 2003)",
                false,
                false,
                EncapKind::Ipip,
                "45ba003c 00004000 4004d3c7 c6336401 cb007107",
            ),
            case(
                "IPv6 in IPv6 (RFC 2473)",
                true,
                true,
                EncapKind::Ipip,
                "62900000 00352940 20010db8010000000000000000000001 20010db8020000000000000000000007",
            ),
            case(
                "IPv4 in IPv6 (RFC 2473)",
                false,
                true,
                EncapKind::Ipip,
                "6ba00000 00280440 20010db8010000000000000000000001 20010db8020000000000000000000007",
            ),
            case(
                "IPv6 in IPv4 (RFC 4213)",
                true,
                false,
                EncapKind::Ipip,
                "45290049 00004000 4029d426 c6336401 cb007107",
            ),
            case(
                "GRE IPv4 in IPv4, no key",
                false,
                false,
                NO_KEY,
                "45ba0040 00004000 402fd398 c6336401 cb007107 00000800",
            ),
            case(
                "GRE IPv4 in IPv4, key",
                false,
                false,
                KEY,
                "45ba0044 00004000 402fd394 c6336401 cb007107 20000800 deadbeef",
            ),
            case(
                "GRE IPv6 in IPv6, no key",
                true,
                true,
                NO_KEY,
                "62900000 00392f40 20010db8010000000000000000000001 20010db8020000000000000000000007 000086dd",
            ),
            case(
                "GRE IPv6 in IPv6, key",
                true,
                true,
                KEY,
                "62900000 003d2f40 20010db8010000000000000000000001 20010db8020000000000000000000007 200086dd deadbeef",
            ),
            case(
                "GRE IPv6 in IPv4, key",
                true,
                false,
                KEY,
                "45290051 00004000 402fd418 c6336401 cb007107 200086dd deadbeef",
            ),
            case(
                "GRE IPv4 in IPv6, no key",
                false,
                true,
                NO_KEY,
                "6ba00000 002c2f40 20010db8010000000000000000000001 20010db8020000000000000000000007 00000800",
            ),
        ]
    }
    /// Independent check of an emitted packet with etherparse: outer header fields, GRE header
    /// and the inner bytes.
    fn check_independently(inner: &[u8], params: &EncapParams, out: &[u8]) {
        let (inner_v6, inner_dscp, inner_ecn) = if inner[0] >> 4 == 6 {
            let h = Ipv6HeaderSlice::from_slice(inner).expect("inner IPv6 header");
            (true, h.dscp().value(), h.ecn().value())
        } else {
            let h = Ipv4HeaderSlice::from_slice(inner).expect("inner IPv4 header");
            (false, h.dcp().value(), h.ecn().value())
        };
        let (gre_key, gre_len) = match params.kind {
            EncapKind::Ipip => (None, 0),
            EncapKind::Gre { key: None } => (None, 4),
            EncapKind::Gre { key: Some(k) } => (Some(k), 8),
        };
        let expected_protocol = match (params.kind, inner_v6) {
            (EncapKind::Gre { .. }, _) => IpNumber::GRE,
            (EncapKind::Ipip, false) => IpNumber::IPV4,
            (EncapKind::Ipip, true) => IpNumber::IPV6,
        };
        let ip_len = match (params.outer_src, params.outer_dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let h = Ipv4HeaderSlice::from_slice(out).expect("outer IPv4 header");
                assert_eq!(h.version(), 4);
                assert_eq!(h.ihl(), 5);
                assert_eq!(usize::from(h.total_len()), out.len());
                assert_eq!(h.identification(), 0);
                assert!(h.dont_fragment());
                assert!(!h.more_fragments());
                assert_eq!(h.fragments_offset().value(), 0);
                assert_eq!(h.ttl(), params.ttl);
                assert_eq!(h.protocol(), expected_protocol);
                assert_eq!(h.dcp().value(), inner_dscp);
                assert_eq!(h.ecn().value(), inner_ecn);
                assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
                assert_eq!((h.source_addr(), h.destination_addr()), (src, dst));
                20
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let h = Ipv6HeaderSlice::from_slice(out).expect("outer IPv6 header");
                assert_eq!(h.version(), 6);
                assert_eq!(usize::from(h.payload_length()), out.len() - 40);
                assert_eq!(h.next_header(), expected_protocol);
                assert_eq!(h.hop_limit(), params.ttl);
                assert_eq!(h.dscp().value(), inner_dscp);
                assert_eq!(h.ecn().value(), inner_ecn);
                assert_eq!(h.flow_label().value(), 0);
                assert_eq!((h.source_addr(), h.destination_addr()), (src, dst));
                40
            }
            _ => panic!("mixed-family params cannot encapsulate"),
        };
        if gre_len > 0 {
            let gre = &out[ip_len..ip_len + gre_len];
            let flags = if gre_key.is_some() { 0x2000 } else { 0 };
            let protocol_type = if inner_v6 { 0x86DD } else { 0x0800 };
            assert_eq!(u16::from_be_bytes([gre[0], gre[1]]), flags);
            assert_eq!(u16::from_be_bytes([gre[2], gre[3]]), protocol_type);
            if let Some(key) = gre_key {
                assert_eq!(gre[4..8], key.to_be_bytes());
            }
        }
        assert_eq!(ip_len + gre_len, overhead(params.kind, ip_len == 40));
        assert_eq!(&out[ip_len + gre_len..], inner, "inner bytes changed");
    }

    #[test]
    fn golden_table_matches_pinned_bytes() {
        let table = golden_table();
        assert!(table.len() >= 8);
        for g in &table {
            let inner = if g.inner_v6 {
                hex(INNER_V6_HEX)
            } else {
                hex(INNER_V4_HEX)
            };
            let mut expected = hex(g.expected_headers);
            expected.extend_from_slice(&inner);
            let mut out = [0u8; 256];
            let len = encapsulate(&inner, &g.params, &mut out)
                .unwrap_or_else(|e| panic!("{}: {e}", g.description));
            assert_eq!(to_hex(&out[..len]), to_hex(&expected), "{}", g.description);
            check_independently(&inner, &g.params, &out[..len]);
            let decap = decapsulate(&out[..len]).expect(g.description);
            assert_eq!(decap.inner, inner.as_slice(), "{}", g.description);
        }
    }

    #[test]
    fn overhead_of_every_kind() {
        let key = EncapKind::Gre { key: Some(1) };
        let no_key = EncapKind::Gre { key: None };
        assert_eq!(overhead(EncapKind::Ipip, false), 20);
        assert_eq!(overhead(EncapKind::Ipip, true), 40);
        assert_eq!(overhead(no_key, false), 24);
        assert_eq!(overhead(no_key, true), 44);
        assert_eq!(overhead(key, false), 28);
        assert_eq!(overhead(key, true), 48);
    }

    #[test]
    fn buffer_too_small_writes_nothing() {
        let inner = ipv4_tcp_syn();
        let p = params(true, EncapKind::Gre { key: Some(7) });
        let needed = 48 + inner.len();
        let mut out = vec![0xAAu8; needed - 1];
        assert_eq!(
            encapsulate(&inner, &p, &mut out),
            Err(EncapError::BufferTooSmall {
                needed,
                available: needed - 1
            })
        );
        assert!(out.iter().all(|&b| b == 0xAA));
        let mut out = vec![0xAAu8; needed + 3];
        assert_eq!(encapsulate(&inner, &p, &mut out), Ok(needed));
        assert_eq!(out[needed..], [0xAA; 3], "bytes past the packet untouched");
    }

    #[test]
    fn bad_inner_packets_are_rejected() {
        let p = params(false, EncapKind::Ipip);
        let mut out = [0u8; 128];
        assert_eq!(encapsulate(&[], &p, &mut out), Err(EncapError::InnerEmpty));
        let mut not_ip = ipv4_tcp_syn();
        not_ip[0] = 0x55;
        assert_eq!(
            encapsulate(&not_ip, &p, &mut out),
            Err(EncapError::InnerNotIp { version: 5 })
        );
        let v4 = ipv4_tcp_syn();
        assert_eq!(
            encapsulate(&v4[..19], &p, &mut out),
            Err(EncapError::InnerTooShort {
                version: 4,
                needed: 20,
                found: 19
            })
        );
        let v6 = ipv6_udp();
        assert_eq!(
            encapsulate(&v6[..39], &p, &mut out),
            Err(EncapError::InnerTooShort {
                version: 6,
                needed: 40,
                found: 39
            })
        );
        assert!(encapsulate(&v6[..40], &p, &mut out).is_ok());
    }

    #[test]
    fn family_mismatch_is_rejected() {
        let inner = ipv4_tcp_syn();
        let mut out = [0u8; 128];
        let mut p = params(false, EncapKind::Ipip);
        p.outer_dst = v6("2001:db8::7");
        let err = encapsulate(&inner, &p, &mut out).expect_err("mixed families");
        assert_eq!(
            err,
            EncapError::FamilyMismatch {
                src: p.outer_src,
                dst: p.outer_dst
            }
        );
        assert!(err.to_string().contains("2001:db8::7"), "{err}");
    }

    #[test]
    fn outer_length_overflow_is_rejected() {
        let mut inner = vec![0u8; 65535 - 20 + 1];
        inner[0] = 0x45;
        let mut out = vec![0u8; 70_000];
        assert_eq!(
            encapsulate(&inner, &params(false, EncapKind::Ipip), &mut out),
            Err(EncapError::TooLong {
                field: "IPv4 total length",
                length: 65536
            })
        );
        assert!(encapsulate(&inner[..65515], &params(false, EncapKind::Ipip), &mut out).is_ok());
        let mut inner = vec![0u8; 65535 - 4 + 1];
        inner[0] = 0x60;
        assert_eq!(
            encapsulate(
                &inner,
                &params(true, EncapKind::Gre { key: None }),
                &mut out
            ),
            Err(EncapError::TooLong {
                field: "IPv6 payload length",
                length: 65536
            })
        );
        assert!(
            encapsulate(
                &inner[..65531],
                &params(true, EncapKind::Gre { key: None }),
                &mut out
            )
            .is_ok()
        );
    }

    /// A GRE-over-IPv4 packet built by hand from a flags word and the optional fields.
    fn gre_over_ipv4(flags: u16, protocol_type: u16, optional: &[u8], inner: &[u8]) -> Vec<u8> {
        let mut gre = Vec::new();
        gre.extend_from_slice(&flags.to_be_bytes());
        gre.extend_from_slice(&protocol_type.to_be_bytes());
        gre.extend_from_slice(optional);
        gre.extend_from_slice(inner);
        let mut out = vec![0u8; 20 + gre.len()];
        let total = u16::try_from(out.len()).expect("small packet");
        let src = Ipv4Addr::new(198, 51, 100, 1);
        let dst = Ipv4Addr::new(203, 0, 113, 7);
        write_ipv4(&mut out, src, dst, 0, total, 64, PROTO_GRE);
        out[20..].copy_from_slice(&gre);
        out
    }

    #[test]
    fn gre_checksum_and_sequence_are_handled() {
        let inner = ipv6_udp();
        // C, K and S: checksum + reserved1, key, sequence number.
        let mut packet = gre_over_ipv4(
            0xB000,
            ETHERTYPE_IPV6,
            &[0, 0, 0, 0, 0, 0, 0, 42, 0, 0, 0, 9],
            &inner,
        );
        let checksum = !ones_complement_sum(&packet[20..]);
        packet[24..26].copy_from_slice(&checksum.to_be_bytes());
        let decap = decapsulate(&packet).expect("valid GRE with C, K, S");
        assert_eq!(decap.gre_key, Some(42));
        assert_eq!(decap.inner, inner.as_slice());
        assert_eq!(decap.outer_src, v4("198.51.100.1"));
        assert_eq!(decap.outer_dst, v4("203.0.113.7"));

        let last = packet.len() - 1;
        packet[last] ^= 0x01;
        assert_eq!(decapsulate(&packet), Err(DecapError::GreChecksum));
    }

    #[test]
    fn gre_unsupported_headers_are_rejected() {
        let inner = ipv4_tcp_syn();
        let cases = [
            (
                0x0001,
                ETHERTYPE_IPV4,
                DecapError::GreVersion { version: 1 },
            ),
            (0x4000, ETHERTYPE_IPV4, DecapError::GreRouting),
            (
                0x0800,
                ETHERTYPE_IPV4,
                DecapError::GreReservedFlags { flags: 0x0800 },
            ),
            (
                0x0400,
                ETHERTYPE_IPV4,
                DecapError::GreReservedFlags { flags: 0x0400 },
            ),
            (
                0x0000,
                0x6558,
                DecapError::GreProtocol {
                    protocol_type: 0x6558,
                },
            ),
            (
                0x0000,
                ETHERTYPE_IPV6,
                DecapError::InnerVersionMismatch {
                    expected: 6,
                    found: 4,
                },
            ),
        ];
        for (flags, protocol_type, expected) in cases {
            let packet = gre_over_ipv4(flags, protocol_type, &[], &inner);
            assert_eq!(decapsulate(&packet), Err(expected), "flags {flags:#06x}");
        }
        // Bits 6-12 are ignored on receipt (RFC 2784 section 2.3).
        let packet = gre_over_ipv4(0x03F8, ETHERTYPE_IPV4, &[], &inner);
        assert_eq!(decapsulate(&packet).map(|d| d.inner), Ok(inner.as_slice()));
    }

    #[test]
    fn outer_header_problems_are_rejected() {
        let inner = ipv4_tcp_syn();
        let mut out = [0u8; 128];
        let len = encapsulate(&inner, &params(false, EncapKind::Ipip), &mut out).expect("encap");
        let good = out[..len].to_vec();

        let mut bad = good.clone();
        bad[9] = 6;
        let checksum = !fold(word_sum(&bad[..10]) + word_sum(&bad[12..20]));
        bad[10..12].copy_from_slice(&checksum.to_be_bytes());
        assert_eq!(
            decapsulate(&bad),
            Err(DecapError::UnsupportedProtocol { protocol: 6 })
        );

        let mut bad = good.clone();
        bad[8] = 1; // TTL changed, checksum not updated.
        let found = u16::from_be_bytes([good[10], good[11]]);
        let expected = Ipv4HeaderSlice::from_slice(&bad)
            .expect("header")
            .to_header()
            .calc_header_checksum();
        assert_eq!(
            decapsulate(&bad),
            Err(DecapError::OuterChecksum { found, expected })
        );

        let mut bad = good.clone();
        bad[6] = 0x20; // MF set.
        let checksum = !fold(word_sum(&bad[..10]) + word_sum(&bad[12..20]));
        bad[10..12].copy_from_slice(&checksum.to_be_bytes());
        assert_eq!(decapsulate(&bad), Err(DecapError::OuterFragment));

        let mut bad = good.clone();
        bad[0] = 0x44;
        assert_eq!(decapsulate(&bad), Err(DecapError::OuterBadIhl { ihl: 4 }));

        let mut bad = good.clone();
        bad[0] = 0x75;
        assert_eq!(
            decapsulate(&bad),
            Err(DecapError::OuterNotIp { version: 7 })
        );

        let mut bad = good.clone();
        bad[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(
            decapsulate(&bad),
            Err(DecapError::OuterBadTotalLen {
                total_len: 19,
                header_len: 20
            })
        );

        // IPv6 outer with a hop-by-hop extension header: not walked, so rejected.
        let len = encapsulate(&inner, &params(true, EncapKind::Ipip), &mut out).expect("encap");
        let mut bad = out[..len].to_vec();
        bad[6] = 0;
        assert_eq!(
            decapsulate(&bad),
            Err(DecapError::UnsupportedProtocol { protocol: 0 })
        );
    }

    #[test]
    fn inner_version_must_match_outer_protocol() {
        let inner = ipv6_udp();
        let mut out = [0u8; 128];
        let len = encapsulate(&inner, &params(true, EncapKind::Ipip), &mut out).expect("encap");
        out[6] = PROTO_IPIP;
        assert_eq!(
            decapsulate(&out[..len]),
            Err(DecapError::InnerVersionMismatch {
                expected: 4,
                found: 6
            })
        );
    }

    #[test]
    fn outer_ipv4_options_and_trailing_padding() {
        let inner = ipv4_tcp_syn();
        // IHL 6: one 4-byte option (four NOPs), then IP-in-IP, then 6 bytes of link padding.
        let mut packet = vec![0u8; 24];
        let total = u16::try_from(24 + inner.len()).expect("small");
        packet[0] = 0x46;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet[6] = 0x40;
        packet[8] = 64;
        packet[9] = PROTO_IPIP;
        packet[12..16].copy_from_slice(&[198, 51, 100, 1]);
        packet[16..20].copy_from_slice(&[203, 0, 113, 7]);
        packet[20..24].copy_from_slice(&[1, 1, 1, 1]);
        let checksum = !ones_complement_sum(&packet);
        packet[10..12].copy_from_slice(&checksum.to_be_bytes());
        packet.extend_from_slice(&inner);
        packet.extend_from_slice(&[0xEE; 6]);
        let decap = decapsulate(&packet).expect("options and padding");
        assert_eq!(decap.inner, inner.as_slice());
        assert_eq!(decap.gre_key, None);
    }

    #[test]
    fn errors_read_well() {
        let e = EncapError::BufferTooSmall {
            needed: 88,
            available: 80,
        };
        assert_eq!(
            e.to_string(),
            "output buffer too small: encapsulated packet needs 88 bytes, 80 available"
        );
        let e = truncated(DecapLayer::Gre, 8, 4);
        assert_eq!(
            e.to_string(),
            "GRE header truncated: needs 8 bytes, 4 present"
        );
    }

    fn inner_spec() -> impl Strategy<Value = InnerSpec> {
        (
            (
                any::<bool>(),
                any::<bool>(),
                any::<[u8; 16]>(),
                any::<[u8; 16]>(),
            ),
            (0u8..64, 0u8..4, 0u32..0x10_0000),
            (any::<u16>(), any::<u16>()),
            prop::collection::vec(any::<u8>(), 0..=200),
        )
            .prop_map(
                |((v6, tcp, src, dst), (dscp, ecn, flow_label), (src_port, dst_port), payload)| {
                    InnerSpec {
                        v6,
                        tcp,
                        src,
                        dst,
                        dscp,
                        ecn,
                        flow_label,
                        src_port,
                        dst_port,
                        payload,
                    }
                },
            )
    }

    fn encap_params() -> impl Strategy<Value = EncapParams> {
        let kind = prop_oneof![
            Just(EncapKind::Ipip),
            Just(EncapKind::Gre { key: None }),
            any::<u32>().prop_map(|k| EncapKind::Gre { key: Some(k) }),
        ];
        (
            any::<bool>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u8>(),
            kind,
        )
            .prop_map(|(v6, src, dst, ttl, kind)| {
                let (outer_src, outer_dst) = if v6 {
                    (
                        IpAddr::V6(Ipv6Addr::from(src)),
                        IpAddr::V6(Ipv6Addr::from(dst)),
                    )
                } else {
                    let four = |a: [u8; 16]| IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]));
                    (four(src), four(dst))
                };
                EncapParams {
                    outer_src,
                    outer_dst,
                    ttl,
                    kind,
                }
            })
    }

    fn encap_vec(inner: &[u8], params: &EncapParams) -> Vec<u8> {
        let mut out = vec![0u8; 48 + inner.len()];
        let len = encapsulate(inner, params, &mut out).expect("valid encapsulation");
        out.truncate(len);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decapsulate_inverts_encapsulate(spec in inner_spec(), params in encap_params()) {
            let inner = build_inner(&spec);
            let packet = encap_vec(&inner, &params);
            check_independently(&inner, &params, &packet);
            let decap = decapsulate(&packet).expect("round trip");
            let key = match params.kind {
                EncapKind::Gre { key } => key,
                EncapKind::Ipip => None,
            };
            prop_assert_eq!(decap.inner, inner.as_slice());
            prop_assert_eq!(decap.outer_src, params.outer_src);
            prop_assert_eq!(decap.outer_dst, params.outer_dst);
            prop_assert_eq!(decap.gre_key, key);
        }

        #[test]
        fn every_truncation_is_an_error(spec in inner_spec(), params in encap_params()) {
            let packet = encap_vec(&build_inner(&spec), &params);
            for len in 0..packet.len() {
                prop_assert!(decapsulate(&packet[..len]).is_err(), "prefix of {} bytes", len);
            }
        }

        #[test]
        fn corrupted_packets_never_panic(
            spec in inner_spec(),
            params in encap_params(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut packet = encap_vec(&build_inner(&spec), &params);
            for (at, value) in flips {
                let i = at.index(packet.len());
                packet[i] = value;
            }
            let _ = decapsulate(&packet);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decapsulate(&bytes);
            let params = EncapParams {
                outer_src: v4("192.0.2.1"),
                outer_dst: v4("192.0.2.2"),
                ttl: 64,
                kind: EncapKind::Gre { key: Some(1) },
            };
            let mut out = [0u8; 128];
            let _ = encapsulate(&bytes, &params, &mut out);
        }
    }
}
