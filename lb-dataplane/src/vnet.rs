//! The virtio-net header (`struct virtio_net_hdr`, 10 bytes) that a TUN opened with
//! `IFF_VNET_HDR` puts before every packet in both directions, the Internet checksum sums the
//! offloads need, and the read side's two duties: completing a partial checksum and cutting a
//! TCP GSO packet into segments ([`complete_checksum`], [`split_tcp`]).
//!
//! **The header** (linux/virtio_net.h). `flags` ([`F_NEEDS_CSUM`]: the transport checksum is
//! partial: the field at `csum_start + csum_offset` holds the folded, *not* complemented sum of
//! the pseudo-header, and the sum over `csum_start..` completes it), `gso_type` ([`GSO_NONE`],
//! [`GSO_TCPV4`], [`GSO_TCPV6`], with [`GSO_ECN`] or'ed in), `hdr_len`, `gso_size` (the payload
//! bytes of each segment but the last), `csum_start`, `csum_offset`. The TUN uses the legacy
//! layout in the host's byte order (the kernel's `tun_is_little_endian` is true on a
//! little-endian host, and on a big-endian one unless `TUNSETVNETLE` was set, which this crate
//! never does), so the fields are read and written native-endian.
//!
//! **What the kernel hands the reader** with `TUNSETOFFLOAD` `TUN_F_CSUM | TUN_F_TSO4 |
//! TUN_F_TSO6` (what [`crate::tun::Tun::enable_offloads`] sets): TCP packets up to 64 KiB with
//! `GSO_TCPV4`/`GSO_TCPV6`, and packets with a partial checksum. `hdr_len` is then the skb's
//! linear length, not the header length, so the headers are measured from the packet itself.
//! Without `TUN_F_TSO_ECN` the kernel segments ECN-marked GSO packets itself; without
//! `TUN_F_USO*` it segments UDP GSO itself.
//!
//! **Checksums.** [`add_words`] sums big-endian 16-bit words four bytes at a time into a `u64`
//! (RFC 1071: the sum of 32-bit words folds to the same 16 bits, since 2^16 ≡ 1 mod 0xFFFF), and
//! [`fold`] folds the carries back. A region that includes a correct checksum folds to 0xFFFF.
//!
//! **Invariants.** Nothing here allocates or panics on any input: lengths and offsets come from
//! the packet and the header and are checked before use, and a packet that does not add up is
//! refused with an [`OffloadError`], never half-written. Every produced segment carries a full,
//! correct IPv4 header checksum and TCP checksum.

/// Bytes of `struct virtio_net_hdr`, what `TUNSETVNETHDRSZ` is set to.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the transport checksum is partial (see the module docs).
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN`, or'ed into the GSO type.
pub const GSO_ECN: u8 = 0x80;

/// IP protocol number of TCP.
const PROTO_TCP: u8 = 6;
/// The TCP flags byte's offset in the TCP header, and the flags the segmenter edits.
const TCP_FLAGS: usize = 13;
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const CWR: u8 = 0x80;
/// The TCP checksum's offset in the TCP header.
pub const TCP_CSUM_OFFSET: u16 = 16;

/// One `struct virtio_net_hdr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    /// [`F_NEEDS_CSUM`] or 0.
    pub flags: u8,
    /// [`GSO_NONE`], [`GSO_TCPV4`], [`GSO_TCPV6`] (or another the kernel knows), maybe with
    /// [`GSO_ECN`].
    pub gso_type: u8,
    /// Header bytes (on write: IP + TCP header; on read: see the module docs).
    pub hdr_len: u16,
    /// Payload bytes of every segment but the last.
    pub gso_size: u16,
    /// Where the checksummed region starts (the transport header).
    pub csum_start: u16,
    /// The checksum field's offset from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHeader {
    /// A plain packet: complete checksums, no segmentation.
    pub const NONE: VnetHeader = VnetHeader {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// The header as the TUN reads it (native byte order, see the module docs).
    #[must_use]
    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }

    /// The header as the TUN wrote it.
    #[must_use]
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> VnetHeader {
        let u16_at = |at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
        VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        }
    }

    /// Whether this packet must be segmented ([`split_tcp`]) before it is sent on.
    #[must_use]
    pub fn is_gso(self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

/// Why a packet read from the TUN could not be completed or segmented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffloadError {
    /// Headers, offsets or lengths that do not fit the packet.
    Malformed,
    /// A GSO type other than TCP over IPv4/IPv6 (the TUN never offers one).
    UnsupportedGso(u8),
    /// A GSO packet whose segments would not fit the output buffer.
    TooBig,
}

impl std::fmt::Display for OffloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OffloadError::Malformed => f.write_str("malformed offload packet"),
            OffloadError::UnsupportedGso(t) => write!(f, "unsupported GSO type {t}"),
            OffloadError::TooBig => f.write_str("segment larger than the buffer"),
        }
    }
}

impl std::error::Error for OffloadError {}

/// `sum` plus the big-endian 16-bit words of `data` (an odd last byte padded with zero), not
/// folded. `data` must start at an even offset of the checksummed region.
#[inline]
#[must_use]
pub fn add_words(mut sum: u64, data: &[u8]) -> u64 {
    let mut quads = data.chunks_exact(4);
    for q in quads.by_ref() {
        sum += u64::from(u32::from_be_bytes([q[0], q[1], q[2], q[3]]));
    }
    match *quads.remainder() {
        [a, b, c] => sum + u64::from(u16::from_be_bytes([a, b])) + (u64::from(c) << 8),
        [a, b] => sum + u64::from(u16::from_be_bytes([a, b])),
        [a] => sum + (u64::from(a) << 8),
        _ => sum,
    }
}

/// Folds the carries of a word sum back in (end-around carry) to 16 bits.
#[inline]
#[must_use]
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    // The loop leaves sum <= 0xFFFF.
    u16::try_from(sum).unwrap_or(u16::MAX)
}

/// The unfolded sum of the TCP/UDP pseudo-header of the IP packet `ip` (IPv4 or IPv6, by its
/// version nibble) for a transport segment of `len` bytes of protocol `protocol`, or `None` if
/// `ip` is too short for its addresses.
#[must_use]
pub fn pseudo_header_sum(ip: &[u8], protocol: u8, len: u32) -> Option<u64> {
    let addresses = match ip.first()? >> 4 {
        4 => ip.get(12..20)?,
        6 => ip.get(8..40)?,
        _ => return None,
    };
    Some(add_words(
        u64::from(protocol) + u64::from(len >> 16) + u64::from(len & 0xFFFF),
        addresses,
    ))
}

/// The IPv4 header checksum of `header` (its checksum field is taken as 0).
#[must_use]
pub fn ipv4_header_checksum(header: &[u8]) -> u16 {
    let sum = add_words(0, header.get(..10).unwrap_or_default());
    !fold(add_words(sum, header.get(12..).unwrap_or_default()))
}

/// Completes the partial checksum of a packet read from the TUN with [`F_NEEDS_CSUM`] (and no
/// GSO): sums `csum_start..` and stores the complement at `csum_start + csum_offset`. A result
/// of 0 is stored as 0xFFFF (the same in one's complement; UDP requires it).
///
/// # Errors
///
/// [`OffloadError::Malformed`] when the checksum field does not lie inside the packet.
pub fn complete_checksum(header: VnetHeader, packet: &mut [u8]) -> Result<(), OffloadError> {
    if header.flags & F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(header.csum_start);
    let at = start + usize::from(header.csum_offset);
    if at + 2 > packet.len() || start % 2 != 0 {
        return Err(OffloadError::Malformed);
    }
    let sum = !fold(add_words(0, &packet[start..]));
    let sum = if sum == 0 { 0xFFFF } else { sum };
    packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// The IPv4 or IPv6 header length of `packet` and whether it is IPv6, if the version is one of
/// the two and the header fits.
fn ip_header(packet: &[u8]) -> Option<(usize, bool)> {
    match packet.first()? >> 4 {
        4 => {
            let len = usize::from(packet[0] & 0x0F) * 4;
            (len >= 20 && packet.len() >= len).then_some((len, false))
        }
        6 => (packet.len() >= 40).then_some((40, true)),
        _ => None,
    }
}

/// Cuts the TCP GSO packet `packet` (as read from the TUN with `header`) into segments of
/// `header.gso_size` payload bytes, as the kernel's `tcp_gso_segment` would: each gets the
/// headers, its sequence number, IPv4 total length, ID (+1 per segment) and header checksum or
/// IPv6 payload length, FIN and PSH only on the last, CWR only on the first, and a full TCP
/// checksum. Each segment is built in `out` and handed to `each`, in order. Returns how many.
///
/// # Errors
///
/// [`OffloadError::UnsupportedGso`] for a GSO type other than TCPV4/TCPV6;
/// [`OffloadError::Malformed`] for headers that do not fit, a `csum_start` that is not the TCP
/// header, a `gso_size` of 0; [`OffloadError::TooBig`] when a segment does not fit `out`.
/// Segments already handed over stay handed over.
pub fn split_tcp(
    header: VnetHeader,
    packet: &[u8],
    out: &mut [u8],
    each: &mut dyn FnMut(&mut [u8]),
) -> Result<usize, OffloadError> {
    let kind = header.gso_type & !GSO_ECN;
    let (ip_len, v6) = ip_header(packet).ok_or(OffloadError::Malformed)?;
    match (kind, v6) {
        (GSO_TCPV4, false) | (GSO_TCPV6, true) => {}
        (GSO_TCPV4 | GSO_TCPV6, _) => return Err(OffloadError::Malformed),
        _ => return Err(OffloadError::UnsupportedGso(header.gso_type)),
    }
    // The transport header: where the kernel says (after any IPv6 extension headers).
    let tcp_at = usize::from(header.csum_start);
    if tcp_at < ip_len || header.csum_offset != TCP_CSUM_OFFSET {
        return Err(OffloadError::Malformed);
    }
    if !v6 && tcp_at != ip_len {
        return Err(OffloadError::Malformed);
    }
    let data_offset = packet.get(tcp_at + 12).ok_or(OffloadError::Malformed)?;
    let tcp_len = usize::from(data_offset >> 4) * 4;
    let headers = tcp_at + tcp_len;
    let mss = usize::from(header.gso_size);
    if tcp_len < 20 || headers > packet.len() || mss == 0 {
        return Err(OffloadError::Malformed);
    }
    let payload = &packet[headers..];
    let seq0 = u32::from_be_bytes([
        packet[tcp_at + 4],
        packet[tcp_at + 5],
        packet[tcp_at + 6],
        packet[tcp_at + 7],
    ]);
    let id0 = u16::from_be_bytes([packet[4], packet[5]]);
    let flags0 = packet[tcp_at + TCP_FLAGS];
    let count = payload.len().div_ceil(mss).max(1);
    for (i, chunk) in payload
        .chunks(mss)
        .chain(payload.is_empty().then_some(&[][..]))
        .enumerate()
    {
        let total = headers + chunk.len();
        let Some(seg) = out.get_mut(..total) else {
            return Err(OffloadError::TooBig);
        };
        seg[..headers].copy_from_slice(&packet[..headers]);
        seg[headers..].copy_from_slice(chunk);
        let total16 = u16::try_from(total).map_err(|_| OffloadError::TooBig)?;
        if v6 {
            seg[4..6].copy_from_slice(&(total16 - 40).to_be_bytes());
        } else {
            seg[2..4].copy_from_slice(&total16.to_be_bytes());
            let id = id0.wrapping_add(u16::try_from(i).unwrap_or(u16::MAX));
            seg[4..6].copy_from_slice(&id.to_be_bytes());
            let check = ipv4_header_checksum(&seg[..ip_len]);
            seg[10..12].copy_from_slice(&check.to_be_bytes());
        }
        let offset = u32::try_from(i * mss).unwrap_or(u32::MAX);
        seg[tcp_at + 4..tcp_at + 8].copy_from_slice(&seq0.wrapping_add(offset).to_be_bytes());
        let mut flags = flags0;
        if i + 1 < count {
            flags &= !(FIN | PSH);
        }
        if i > 0 {
            flags &= !CWR;
        }
        seg[tcp_at + TCP_FLAGS] = flags;
        let csum_at = tcp_at + usize::from(TCP_CSUM_OFFSET);
        seg[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
        let tcp_total = u32::try_from(total - tcp_at).unwrap_or(u32::MAX);
        let pseudo = pseudo_header_sum(seg, PROTO_TCP, tcp_total).ok_or(OffloadError::Malformed)?;
        let check = !fold(add_words(pseudo, &seg[tcp_at..]));
        seg[csum_at..csum_at + 2].copy_from_slice(&check.to_be_bytes());
        each(seg);
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use etherparse::{SlicedPacket, TransportSlice};

    use super::*;

    /// A GSO packet as the kernel hands it over: IPv4 (ID 7) + TCP (20 bytes, flags `flags`)
    /// + `payload`, total length set, TCP checksum field = folded pseudo-header sum.
    fn gso_v4(payload: &[u8], flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&7u16.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[198, 18, 21, 2]);
        p[16..20].copy_from_slice(&[198, 19, 0, 2]);
        p[20..22].copy_from_slice(&4242u16.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        p[24..28].copy_from_slice(&u32::MAX.to_be_bytes()); // wraps
        p[32] = 5 << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&1000u16.to_be_bytes());
        p.extend_from_slice(payload);
        let check = ipv4_header_checksum(&p[..20]);
        p[10..12].copy_from_slice(&check.to_be_bytes());
        let pseudo = fold(pseudo_header_sum(&p, 6, (p.len() - 20) as u32).unwrap());
        p[36..38].copy_from_slice(&pseudo.to_be_bytes());
        p
    }

    fn header(gso_size: u16) -> VnetHeader {
        VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 40,
            gso_size,
            csum_start: 20,
            csum_offset: 16,
        }
    }

    #[test]
    fn header_bytes_round_trip_in_native_order() {
        let h = VnetHeader {
            flags: 1,
            gso_type: GSO_TCPV6 | GSO_ECN,
            hdr_len: 0x0102,
            gso_size: 1448,
            csum_start: 40,
            csum_offset: 16,
        };
        assert_eq!(VnetHeader::from_bytes(&h.to_bytes()), h);
        assert_eq!(h.to_bytes()[4..6], 1448u16.to_ne_bytes());
        assert!(h.is_gso());
        assert!(!VnetHeader::NONE.is_gso());
        assert_eq!(VnetHeader::NONE.to_bytes(), [0; VNET_HDR_LEN]);
    }

    #[test]
    fn split_tcp_cuts_like_the_kernel() {
        let payload: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let flags = 0x80 | 0x10 | 0x08 | 0x01; // CWR ACK PSH FIN
        let p = gso_v4(&payload, flags);
        let mut out = vec![0u8; 2000];
        let mut segs = Vec::new();
        let n = split_tcp(header(1000), &p, &mut out, &mut |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(n, 3);
        let mut data = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let parsed = SlicedPacket::from_ip(s).unwrap();
            let Some(etherparse::NetSlice::Ipv4(ip)) = &parsed.net else {
                panic!()
            };
            let Some(TransportSlice::Tcp(tcp)) = &parsed.transport else {
                panic!()
            };
            let ip_header = ip.header().to_header();
            assert_eq!(ip_header.calc_header_checksum(), ip_header.header_checksum);
            assert_eq!(ip_header.identification, 7 + i as u16);
            assert_eq!(
                tcp.to_header()
                    .calc_checksum_ipv4(&ip_header, tcp.payload())
                    .unwrap(),
                tcp.checksum(),
                "segment {i}: full TCP checksum"
            );
            assert_eq!(
                tcp.sequence_number(),
                u32::MAX.wrapping_add(1000 * i as u32)
            );
            assert_eq!(tcp.cwr(), i == 0, "CWR on the first only");
            assert_eq!(
                (tcp.fin(), tcp.psh()),
                (i == 2, i == 2),
                "FIN, PSH on the last"
            );
            assert!(tcp.ack());
            data.extend_from_slice(tcp.payload());
        }
        assert_eq!(data, payload);
        assert_eq!(segs[2].len(), 40 + 500);
    }

    #[test]
    fn split_tcp_refuses_what_does_not_add_up() {
        let p = gso_v4(&[1; 3000], 0x10);
        let mut out = vec![0u8; 2000];
        let mut none = |_: &mut [u8]| panic!("nothing handed over");
        let udp = VnetHeader {
            gso_type: 5,
            ..header(1000)
        };
        assert_eq!(
            split_tcp(udp, &p, &mut out, &mut none),
            Err(OffloadError::UnsupportedGso(5))
        );
        let v6_on_v4 = VnetHeader {
            gso_type: GSO_TCPV6,
            ..header(1000)
        };
        assert_eq!(
            split_tcp(v6_on_v4, &p, &mut out, &mut none),
            Err(OffloadError::Malformed)
        );
        for bad in [
            VnetHeader {
                gso_size: 0,
                ..header(0)
            },
            VnetHeader {
                csum_start: 24,
                ..header(1000)
            },
            VnetHeader {
                csum_offset: 6,
                ..header(1000)
            },
        ] {
            assert_eq!(
                split_tcp(bad, &p, &mut out, &mut none),
                Err(OffloadError::Malformed),
                "{bad:?}"
            );
        }
        assert_eq!(
            split_tcp(header(1000), &p[..30], &mut out, &mut none),
            Err(OffloadError::Malformed)
        );
        let mut small = [0u8; 500];
        assert_eq!(
            split_tcp(header(1000), &p, &mut small, &mut none),
            Err(OffloadError::TooBig)
        );
        // Garbage never panics.
        for cut in 0..p.len().min(80) {
            let _ = split_tcp(header(7), &p[..cut], &mut out, &mut |_| {});
        }
    }

    #[test]
    fn complete_checksum_fills_the_partial_field() {
        let payload = b"partial checksum";
        let mut p = gso_v4(payload, 0x18);
        let h = header(0);
        complete_checksum(h, &mut p).unwrap();
        let completed = p.clone();
        let parsed = SlicedPacket::from_ip(&completed).unwrap();
        let (Some(etherparse::NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) =
            (&parsed.net, &parsed.transport)
        else {
            panic!()
        };
        assert_eq!(
            tcp.to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
                .unwrap(),
            tcp.checksum()
        );
        // No NEEDS_CSUM: untouched. A field outside the packet: refused, untouched.
        let before = p.clone();
        complete_checksum(VnetHeader::NONE, &mut p).unwrap();
        assert_eq!(p, before);
        let outside = VnetHeader {
            csum_offset: 200,
            ..h
        };
        assert_eq!(
            complete_checksum(outside, &mut p),
            Err(OffloadError::Malformed)
        );
        assert_eq!(p, before);
    }

    #[test]
    fn word_sums_match_the_plain_rfc_1071_sum() {
        let data: Vec<u8> = (0..1001u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in [0, 1, 2, 3, 4, 5, 6, 7, 64, 999, 1000, 1001] {
            let d = &data[..len];
            let mut plain: u64 = 0;
            for w in d.chunks(2) {
                plain += u64::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)]));
            }
            assert_eq!(fold(add_words(0, d)), fold(plain), "{len} bytes");
        }
    }
}
