//! Receive-side coalescing for the agent's TUN writes (what the kernel's GRO does for a NIC):
//! the TCP segments of one flow that arrive in one batch become one large packet, written once
//! with a virtio-net header (`GSO_TCPV4`/`GSO_TCPV6`, [`crate::vnet`]) that tells the kernel
//! their segment size. The kernel then delivers one super-packet to the socket instead of many
//! (local delivery takes GSO packets, as it takes GRO ones), and the agent makes one `write`
//! instead of one per segment.
//!
//! **When segments merge** (the rules of the kernel's `tcp_gro_receive` and wireguard-go's
//! `tcpGRO`). A packet is a *candidate* when it is IPv4 without options and not a fragment
//! (only DF may be set), or IPv6 whose next header is TCP; its IP length matches the bytes
//! given; its TCP flags are exactly ACK or ACK+PSH; it carries payload. A candidate is
//! appended to its flow's open super-packet when all of these hold:
//! - same addresses, ports and IP version (the flow), and it is the flow's latest item;
//! - IPv4: same TOS, TTL and DF, and, without DF, the next IP ID; IPv6: same traffic class,
//!   flow label and hop limit;
//! - same TCP header length and identical options (timestamps included), same ACK number and
//!   window; its sequence number is the super-packet's next one;
//! - its payload is at most the first segment's (the GSO size), and no shorter segment or PSH
//!   came before it (a shorter segment or PSH ends the super-packet);
//! - the result stays within 65 535 bytes;
//! - its TCP checksum and the first segment's are right (the kernel trusts a partial checksum
//!   on local delivery, so a corrupted segment must not hide in a super-packet; it is written
//!   alone, and the kernel drops it).
//!
//! Anything else is written as it came, with a header saying "no GSO, checksum complete".
//!
//! **Order.** Items are written in the order they were started. A TCP packet that cannot join
//! its flow's open super-packet closes it and starts a new item after it, so the packets of one
//! flow are written in arrival order; a TCP-carrying packet whose ports cannot be read (an IPv4
//! fragment, an IPv6 packet with extension headers) closes every open super-packet. Packets of
//! different flows may be written in another order than they arrived (as with GRO).
//!
//! **Memory.** [`Coalescer::new`] allocates everything: `max_items` slots of
//! [`VNET_HDR_LEN`] + 65 535 bytes each (a slot holds one item, its virtio-net header in
//! front, so each write is one contiguous buffer). [`Coalescer::push`] and
//! [`Coalescer::flush`] never allocate and take no locks; the only syscall is the caller's
//! write, once per item at flush.
//!
//! **Invariants.** No input panics; a super-packet's IPv4 header checksum is complete and its
//! TCP checksum field holds the folded pseudo-header sum over the super-packet's TCP length, as
//! `VIRTIO_NET_HDR_F_NEEDS_CSUM` requires; every pushed packet is written exactly once (in a
//! super-packet or alone) or reported as failed.

use std::io;

use crate::vnet::{
    F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, TCP_CSUM_OFFSET, VNET_HDR_LEN, VnetHeader, add_words, fold,
    ipv4_header_checksum, pseudo_header_sum,
};

/// The largest packet (and super-packet): an IP length field's maximum.
pub const MAX_PACKET: usize = 65_535;
/// Bytes of one slot: the virtio-net header, then the packet.
const SLOT: usize = VNET_HDR_LEN + MAX_PACKET;

const PROTO_TCP: u8 = 6;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// A TCP flow: both addresses (IPv4 in the first 4 bytes of each) and both ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FlowId {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    ports: [u8; 4],
}

/// What one TCP packet looks like, as far as coalescing is concerned.
#[derive(Clone, Copy, Debug)]
struct Segment {
    flow: FlowId,
    /// A coalescing candidate (see the module docs).
    candidate: bool,
    ip_len: usize,
    tcp_len: usize,
    seq: u32,
    psh: bool,
}

/// One pending write: a packet or a super-packet in its slot.
#[derive(Clone, Copy, Debug)]
struct Item {
    /// Packet bytes in the slot, after the virtio-net header.
    len: usize,
    /// Segments in it (1: a plain packet).
    segments: u32,
    /// IPv6 (for the GSO type).
    v6: bool,
    /// The flow, for a TCP candidate; `None` for anything else.
    flow: Option<FlowId>,
    /// It may still take segments.
    open: bool,
    /// Header lengths of the first segment.
    ip_len: usize,
    tcp_len: usize,
    /// Payload bytes of the first segment: the GSO size.
    gso_size: usize,
    /// The sequence number the next segment must have.
    next_seq: u32,
    /// The IPv4 ID the next segment must have (IPv4 without DF only).
    next_id: u16,
    /// The first segment's TCP checksum was verified.
    verified: bool,
}

impl Item {
    /// An item of one packet of `len` bytes, not open, of no flow.
    fn plain(len: usize, v6: bool) -> Item {
        Item {
            len,
            segments: 1,
            v6,
            flow: None,
            open: false,
            ip_len: 0,
            tcp_len: 0,
            gso_size: 0,
            next_seq: 0,
            next_id: 0,
            verified: false,
        }
    }

    /// Whether it is the open super-packet of `flow`.
    fn open_for(&self, flow: &FlowId) -> bool {
        self.open && self.flow.as_ref() == Some(flow)
    }
}

/// Why [`Coalescer::push`] did not take a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// Every slot is taken: flush, then push again.
    Full,
    /// Longer than any IP packet ([`MAX_PACKET`]) or empty.
    BadLength,
}

/// What one [`Coalescer::flush`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushCounts {
    /// Writes that succeeded.
    pub writes: u64,
    /// Packets in those writes (a super-packet counts its segments).
    pub packets: u64,
    /// Of those packets, the ones written as part of a super-packet of two or more.
    pub coalesced: u64,
    /// Writes that failed.
    pub failed_writes: u64,
    /// Packets in the failed writes.
    pub failed_packets: u64,
}

/// The coalescer: see the module docs.
#[derive(Debug)]
pub struct Coalescer {
    slots: Box<[u8]>,
    items: Vec<Item>,
    max_items: usize,
}

/// The big-endian `u16` at `at` of `b` (the caller checked the bounds).
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The big-endian `u32` at `at` of `b` (the caller checked the bounds).
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// How a packet relates to TCP flows.
enum Class {
    /// A TCP packet of a known flow.
    Tcp(Segment),
    /// Not TCP (or IPv6 UDP/ICMPv6): no flow of ours.
    Other,
    /// TCP (or maybe TCP) whose ports cannot be read: closes every open item.
    Opaque,
}

fn classify(p: &[u8]) -> Class {
    let Some(&first) = p.first() else {
        return Class::Other;
    };
    let (ip_len, v6, exact, plain) = match first >> 4 {
        4 => {
            if p.len() < 20 || p[9] != PROTO_TCP {
                return Class::Other;
            }
            let ip_len = usize::from(first & 0x0F) * 4;
            let frag = be16(p, 6);
            // Only DF (0x4000) may be set: no MF, no offset, no reserved bit.
            let unfragmented = frag & 0xBFFF == 0;
            if frag & 0x1FFF != 0 || ip_len < 20 {
                // A later fragment: no ports in it.
                return Class::Opaque;
            }
            (
                ip_len,
                false,
                usize::from(be16(p, 2)) == p.len(),
                ip_len == 20 && unfragmented,
            )
        }
        6 => {
            if p.len() < 40 {
                return Class::Other;
            }
            match p[6] {
                PROTO_TCP => {}
                // UDP, ICMPv6, no next header: no TCP flow.
                17 | 58 | 59 => return Class::Other,
                // Extension headers: TCP may hide behind them.
                _ => return Class::Opaque,
            }
            (40, true, usize::from(be16(p, 4)) + 40 == p.len(), true)
        }
        _ => return Class::Other,
    };
    if p.len() < ip_len + 20 {
        return Class::Opaque;
    }
    let t = ip_len;
    let tcp_len = usize::from(p[t + 12] >> 4) * 4;
    let mut flow = FlowId {
        v6,
        src: [0; 16],
        dst: [0; 16],
        ports: [p[t], p[t + 1], p[t + 2], p[t + 3]],
    };
    if v6 {
        flow.src.copy_from_slice(&p[8..24]);
        flow.dst.copy_from_slice(&p[24..40]);
    } else {
        flow.src[..4].copy_from_slice(&p[12..16]);
        flow.dst[..4].copy_from_slice(&p[16..20]);
    }
    let flags = p[t + 13];
    let candidate = plain
        && exact
        && tcp_len >= 20
        && p.len() > ip_len + tcp_len
        && (flags == TCP_ACK || flags == TCP_ACK | TCP_PSH);
    Class::Tcp(Segment {
        flow,
        candidate,
        ip_len,
        tcp_len,
        seq: be32(p, t + 4),
        psh: flags & TCP_PSH != 0,
    })
}

/// Whether the TCP checksum of the whole packet `p` (TCP header at `ip_len`) is right.
fn tcp_checksum_ok(p: &[u8], ip_len: usize) -> bool {
    let Some(tcp) = p.get(ip_len..) else {
        return false;
    };
    let len = u32::try_from(tcp.len()).unwrap_or(u32::MAX);
    pseudo_header_sum(p, PROTO_TCP, len).is_some_and(|sum| fold(add_words(sum, tcp)) == 0xFFFF)
}

impl Coalescer {
    /// A coalescer holding up to `max_items` pending items (at least 1): allocates
    /// `max_items` × ([`VNET_HDR_LEN`] + 65 535) bytes now.
    #[must_use]
    pub fn new(max_items: usize) -> Coalescer {
        let max_items = max_items.max(1);
        Coalescer {
            slots: vec![0u8; max_items * SLOT].into_boxed_slice(),
            items: Vec::with_capacity(max_items),
            max_items,
        }
    }

    /// Items waiting for [`Coalescer::flush`].
    #[must_use]
    pub fn pending(&self) -> usize {
        self.items.len()
    }

    /// The packet bytes of item `i` (after its virtio-net header).
    fn packet(&self, i: usize, len: usize) -> &[u8] {
        let at = i * SLOT + VNET_HDR_LEN;
        &self.slots[at..at + len]
    }

    /// Takes one IP packet (IPv4 or IPv6, starting at its header): appended to its flow's open
    /// super-packet, or kept as a new item. It is copied; `packet` can be reused at once.
    ///
    /// # Errors
    ///
    /// [`PushError::Full`] when a new item is needed and every slot is taken (the packet was
    /// not taken: flush and push again); [`PushError::BadLength`] for an empty packet or one
    /// longer than [`MAX_PACKET`].
    pub fn push(&mut self, packet: &[u8]) -> Result<(), PushError> {
        if packet.is_empty() || packet.len() > MAX_PACKET {
            return Err(PushError::BadLength);
        }
        let v6 = packet[0] >> 4 == 6;
        let segment = match classify(packet) {
            Class::Tcp(s) => s,
            Class::Other => return self.start(packet, Item::plain(packet.len(), v6)),
            Class::Opaque => {
                if self.items.len() == self.max_items {
                    return Err(PushError::Full);
                }
                for item in &mut self.items {
                    item.open = false;
                }
                return self.start(packet, Item::plain(packet.len(), v6));
            }
        };
        // Only the flow's latest item can be open: starting a new one closes the old.
        if let Some(i) = self
            .items
            .iter()
            .rposition(|item| item.open_for(&segment.flow))
        {
            if segment.candidate && self.try_append(i, packet, &segment) {
                return Ok(());
            }
            if self.items.len() == self.max_items {
                return Err(PushError::Full);
            }
            // Cannot join: the flow's super-packet ends here, and this packet goes after it.
            self.items[i].open = false;
        }
        let mut item = Item::plain(packet.len(), v6);
        if segment.candidate {
            let payload = packet.len() - segment.ip_len - segment.tcp_len;
            item = Item {
                flow: Some(segment.flow),
                // PSH is only ever on the last segment.
                open: !segment.psh,
                ip_len: segment.ip_len,
                tcp_len: segment.tcp_len,
                gso_size: payload,
                next_seq: segment
                    .seq
                    .wrapping_add(u32::try_from(payload).unwrap_or(0)),
                next_id: be16(packet, 4).wrapping_add(1),
                ..item
            };
        }
        self.start(packet, item)
    }

    /// Starts `item`, holding `packet`.
    fn start(&mut self, packet: &[u8], item: Item) -> Result<(), PushError> {
        let i = self.items.len();
        if i == self.max_items {
            return Err(PushError::Full);
        }
        let at = i * SLOT + VNET_HDR_LEN;
        self.slots[at..at + packet.len()].copy_from_slice(packet);
        self.items.push(item);
        Ok(())
    }

    /// Appends candidate `p` to the open item `i` of its flow if every rule of the module docs
    /// holds; otherwise changes nothing (but remembers a verified first checksum).
    fn try_append(&mut self, i: usize, p: &[u8], s: &Segment) -> bool {
        let item = self.items[i];
        let payload = p.len() - s.ip_len - s.tcp_len;
        if s.ip_len != item.ip_len
            || s.tcp_len != item.tcp_len
            || s.seq != item.next_seq
            || payload > item.gso_size
            || item.len + payload > MAX_PACKET
        {
            return false;
        }
        let head = self.packet(i, item.len);
        let t = s.ip_len;
        let ip_same = if item.v6 {
            // Version, traffic class, flow label; hop limit.
            p[..4] == head[..4] && p[7] == head[7]
        } else {
            let df = p[6] & 0x40 != 0;
            // TOS; flags (DF); TTL; without DF, consecutive IDs.
            p[1] == head[1]
                && p[6..8] == head[6..8]
                && p[8] == head[8]
                && (df || be16(p, 4) == item.next_id)
        };
        // ACK number and data offset; window; options.
        let tcp_same = p[t + 8..t + 13] == head[t + 8..t + 13]
            && p[t + 14..t + 16] == head[t + 14..t + 16]
            && p[t + 20..t + s.tcp_len] == head[t + 20..t + s.tcp_len];
        if !ip_same || !tcp_same {
            return false;
        }
        if !item.verified {
            if !tcp_checksum_ok(head, t) {
                return false;
            }
            self.items[i].verified = true;
        }
        if !tcp_checksum_ok(p, t) {
            return false;
        }
        let at = i * SLOT + VNET_HDR_LEN;
        self.slots[at + item.len..at + item.len + payload].copy_from_slice(&p[t + s.tcp_len..]);
        if s.psh {
            self.slots[at + t + 13] |= TCP_PSH;
        }
        let item = &mut self.items[i];
        item.len += payload;
        item.segments += 1;
        item.next_seq = item
            .next_seq
            .wrapping_add(u32::try_from(payload).unwrap_or(0));
        item.next_id = item.next_id.wrapping_add(1);
        // A shorter segment or PSH is the last one.
        item.open = payload == item.gso_size && !s.psh;
        true
    }

    /// Finishes the headers of item `i` and returns its virtio-net header.
    fn finish(&mut self, i: usize) -> VnetHeader {
        let item = self.items[i];
        if item.segments < 2 {
            return VnetHeader::NONE;
        }
        let (ip_len, tcp_len) = (item.ip_len, item.tcp_len);
        let at = i * SLOT + VNET_HDR_LEN;
        let p = &mut self.slots[at..at + item.len];
        // `try_append` keeps len <= MAX_PACKET, and len > ip_len + tcp_len >= 40.
        let len16 = u16::try_from(item.len).unwrap_or(u16::MAX);
        if item.v6 {
            p[4..6].copy_from_slice(&len16.saturating_sub(40).to_be_bytes());
        } else {
            p[2..4].copy_from_slice(&len16.to_be_bytes());
            let check = ipv4_header_checksum(&p[..ip_len]);
            p[10..12].copy_from_slice(&check.to_be_bytes());
        }
        let tcp_total = u32::try_from(item.len - ip_len).unwrap_or(u32::MAX);
        let pseudo = fold(pseudo_header_sum(p, PROTO_TCP, tcp_total).unwrap_or(0));
        let csum = ip_len + usize::from(TCP_CSUM_OFFSET);
        p[csum..csum + 2].copy_from_slice(&pseudo.to_be_bytes());
        VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: if item.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: u16::try_from(ip_len + tcp_len).unwrap_or(u16::MAX),
            gso_size: u16::try_from(item.gso_size).unwrap_or(u16::MAX),
            csum_start: u16::try_from(ip_len).unwrap_or(u16::MAX),
            csum_offset: TCP_CSUM_OFFSET,
        }
    }

    /// Writes every pending item in order, each with its virtio-net header in front, through
    /// `write` (one call per item, given the header and packet as one buffer), and empties
    /// the coalescer.
    pub fn flush(&mut self, write: &mut dyn FnMut(&[u8]) -> io::Result<()>) -> FlushCounts {
        let mut counts = FlushCounts::default();
        for i in 0..self.items.len() {
            let header = self.finish(i);
            let item = self.items[i];
            let at = i * SLOT;
            self.slots[at..at + VNET_HDR_LEN].copy_from_slice(&header.to_bytes());
            let segments = u64::from(item.segments);
            match write(&self.slots[at..at + VNET_HDR_LEN + item.len]) {
                Ok(()) => {
                    counts.writes += 1;
                    counts.packets += segments;
                    if segments > 1 {
                        counts.coalesced += segments;
                    }
                }
                Err(_) => {
                    counts.failed_writes += 1;
                    counts.failed_packets += segments;
                }
            }
        }
        self.items.clear();
        counts
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use etherparse::{IpNumber, Ipv4Header, Ipv6Header, TcpHeader, TcpOptionElement};

    use super::*;
    use crate::vnet::{GSO_NONE, complete_checksum, split_tcp};

    const SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
    const SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);
    const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x100, 0, 0, 0, 1);

    /// One TCP segment to build; `Seg::new` is an ACK with a timestamp option, DF, in order.
    #[derive(Clone, Copy, Debug)]
    struct Seg {
        v6: bool,
        port: u16,
        seq: u32,
        ack: u32,
        len: usize,
        psh: bool,
        fin: bool,
        syn: bool,
        rst: bool,
        /// Timestamp value (`None`: no options).
        ts: Option<u32>,
        id: u16,
        df: bool,
        window: u16,
        ttl: u8,
        corrupt: bool,
    }

    impl Seg {
        fn new(seq: u32, len: usize) -> Seg {
            Seg {
                v6: false,
                port: 40000,
                seq,
                ack: 77,
                len,
                psh: false,
                fin: false,
                syn: false,
                rst: false,
                ts: Some(1000),
                id: 0,
                df: true,
                window: 512,
                ttl: 64,
                corrupt: false,
            }
        }

        /// The packet: payload byte `k` is `(seq + k) as u8`, so a stream reads back in order.
        fn build(self) -> Vec<u8> {
            let payload: Vec<u8> = (0..self.len)
                .map(|k| (self.seq as usize + k) as u8)
                .collect();
            let mut tcp = TcpHeader::new(self.port, 80, self.seq, self.window);
            tcp.ack = true;
            tcp.acknowledgment_number = self.ack;
            tcp.psh = self.psh;
            tcp.fin = self.fin;
            tcp.syn = self.syn;
            tcp.rst = self.rst;
            if let Some(ts) = self.ts {
                tcp.set_options(&[
                    TcpOptionElement::Noop,
                    TcpOptionElement::Noop,
                    TcpOptionElement::Timestamp(ts, 5),
                ])
                .unwrap();
            }
            let mut out = Vec::new();
            if self.v6 {
                let ip = Ipv6Header {
                    traffic_class: 0,
                    flow_label: 0x12345.try_into().unwrap(),
                    payload_length: (tcp.header_len() + self.len) as u16,
                    next_header: IpNumber::TCP,
                    hop_limit: self.ttl,
                    source: SRC6.octets(),
                    destination: VIP6.octets(),
                };
                tcp.checksum = tcp.calc_checksum_ipv6(&ip, &payload).unwrap();
                ip.write(&mut out).unwrap();
            } else {
                let mut ip = Ipv4Header::new(
                    (tcp.header_len() + self.len) as u16,
                    self.ttl,
                    IpNumber::TCP,
                    SRC.octets(),
                    VIP.octets(),
                )
                .unwrap();
                ip.identification = self.id;
                ip.dont_fragment = self.df;
                ip.header_checksum = ip.calc_header_checksum();
                tcp.checksum = tcp.calc_checksum_ipv4(&ip, &payload).unwrap();
                ip.write(&mut out).unwrap();
            }
            tcp.write(&mut out).unwrap();
            out.extend_from_slice(&payload);
            if self.corrupt {
                *out.last_mut().unwrap() ^= 0xFF;
            }
            out
        }
    }

    /// A run of `n` in-order segments of `len` bytes from `seq`, IDs counting up.
    fn run(seq: u32, len: usize, n: usize) -> Vec<Seg> {
        (0..n)
            .map(|i| Seg {
                id: i as u16,
                ..Seg::new(seq + (i * len) as u32, len)
            })
            .collect()
    }

    /// The frames the coalescer writes for `packets`, pushed in order, flushed once.
    fn coalesce(packets: &[Vec<u8>]) -> (Vec<(VnetHeader, Vec<u8>)>, FlushCounts) {
        let mut c = Coalescer::new(64);
        for p in packets {
            c.push(p).unwrap();
        }
        let mut frames = Vec::new();
        let counts = c.flush(&mut |frame| {
            let header = VnetHeader::from_bytes(frame[..VNET_HDR_LEN].try_into().unwrap());
            frames.push((header, frame[VNET_HDR_LEN..].to_vec()));
            Ok(())
        });
        assert_eq!(c.pending(), 0);
        (frames, counts)
    }

    fn built(segs: &[Seg]) -> Vec<Vec<u8>> {
        segs.iter().map(|s| s.build()).collect()
    }

    /// The plain RFC 1071 checksum over 16-bit words: independent of `vnet`'s word sums.
    fn reference_sum(chunks: &[&[u8]]) -> u16 {
        let mut sum: u32 = 0;
        for data in chunks {
            for w in data.chunks(2) {
                sum += u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)]));
            }
        }
        while sum > 0xFFFF {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        sum as u16
    }

    /// Checks a super-packet: its header says GSO with the segment size, its IP header is
    /// right, its checksum field holds the folded pseudo-header sum, and cutting it up again
    /// gives back exactly `segments`.
    fn check_super(header: VnetHeader, packet: &[u8], segments: &[Vec<u8>]) {
        let v6 = packet[0] >> 4 == 6;
        let ip_len = if v6 { 40 } else { 20 };
        let tcp_len = usize::from(packet[ip_len + 12] >> 4) * 4;
        let first_payload = segments[0].len() - ip_len - tcp_len;
        assert_eq!(
            header,
            VnetHeader {
                flags: F_NEEDS_CSUM,
                gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                hdr_len: (ip_len + tcp_len) as u16,
                gso_size: first_payload as u16,
                csum_start: ip_len as u16,
                csum_offset: 16,
            }
        );
        let tcp_total = (packet.len() - ip_len) as u16;
        let pseudo = if v6 {
            assert_eq!(u16::from_be_bytes([packet[4], packet[5]]), tcp_total);
            reference_sum(&[&packet[8..40], &[0, 6], &tcp_total.to_be_bytes()])
        } else {
            assert_eq!(
                u16::from_be_bytes([packet[2], packet[3]]) as usize,
                packet.len()
            );
            assert_eq!(
                reference_sum(&[&packet[..20]]),
                0xFFFF,
                "IPv4 header checksum"
            );
            reference_sum(&[&packet[12..20], &[0, 6], &tcp_total.to_be_bytes()])
        };
        let field = u16::from_be_bytes([packet[ip_len + 16], packet[ip_len + 17]]);
        assert_eq!(
            field, pseudo,
            "the pseudo-header sum, folded, not complemented"
        );
        // What the kernel does with it: complete the checksum (local delivery trusts it as
        // it is), or cut the packet up (forwarding).
        let mut completed = packet.to_vec();
        complete_checksum(header, &mut completed).unwrap();
        let addresses = if v6 { &packet[8..40] } else { &packet[12..20] };
        assert_eq!(
            reference_sum(&[
                addresses,
                &[0, 6],
                &tcp_total.to_be_bytes(),
                &completed[ip_len..]
            ]),
            0xFFFF,
            "the completed checksum verifies"
        );
        let mut out = vec![0u8; MAX_PACKET];
        let mut again = Vec::new();
        let n = split_tcp(header, packet, &mut out, &mut |seg| {
            again.push(seg.to_vec());
        })
        .unwrap();
        assert_eq!(n, segments.len());
        assert_eq!(
            again, segments,
            "cut up again, the super-packet is the segments"
        );
    }

    #[test]
    fn in_order_segments_become_one_write() {
        let segs = built(&run(1000, 1200, 4));
        let (frames, counts) = coalesce(&segs);
        assert_eq!(frames.len(), 1);
        assert_eq!(
            counts,
            FlushCounts {
                writes: 1,
                packets: 4,
                coalesced: 4,
                failed_writes: 0,
                failed_packets: 0
            }
        );
        let (header, packet) = &frames[0];
        assert_eq!(packet.len(), 20 + 32 + 4 * 1200);
        check_super(*header, packet, &segs);
    }

    #[test]
    fn a_gap_in_sequence_starts_a_new_item() {
        let mut segs = run(1000, 1000, 2);
        segs.extend(
            run(4000, 1000, 2)
                .into_iter()
                .map(|s| Seg { id: s.id + 2, ..s }),
        );
        let packets = built(&segs);
        let (frames, counts) = coalesce(&packets);
        assert_eq!(frames.len(), 2);
        assert_eq!((counts.writes, counts.packets, counts.coalesced), (2, 4, 4));
        check_super(frames[0].0, &frames[0].1, &packets[..2]);
        check_super(frames[1].0, &frames[1].1, &packets[2..]);
    }

    #[test]
    fn interleaved_flows_coalesce_separately_in_order_of_their_first_packet() {
        let a = run(1000, 1000, 3);
        let b: Vec<Seg> = run(50_000, 800, 3)
            .into_iter()
            .map(|s| Seg { port: 40001, ..s })
            .collect();
        let order = [a[0], b[0], a[1], b[1], a[2], b[2]];
        let (frames, counts) = coalesce(&built(&order));
        assert_eq!(frames.len(), 2);
        assert_eq!((counts.writes, counts.packets, counts.coalesced), (2, 6, 6));
        check_super(frames[0].0, &frames[0].1, &built(&a));
        check_super(frames[1].0, &frames[1].1, &built(&b));
    }

    #[test]
    fn psh_ends_a_super_packet_and_is_kept_on_its_last_segment() {
        let mut segs = run(1000, 1000, 4);
        segs[1].psh = true;
        let packets = built(&segs);
        let (frames, _) = coalesce(&packets);
        assert_eq!(frames.len(), 2);
        // The first two, PSH on the whole (as on its last segment); then the other two.
        assert_eq!(frames[0].1[20 + 13], TCP_ACK | TCP_PSH);
        check_super(frames[0].0, &frames[0].1, &packets[..2]);
        check_super(frames[1].0, &frames[1].1, &packets[2..]);
        // PSH on the first segment: it stays alone.
        let mut segs = run(1000, 1000, 3);
        segs[0].psh = true;
        let packets = built(&segs);
        let (frames, _) = coalesce(&packets);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], (VnetHeader::NONE, packets[0].clone()));
        check_super(frames[1].0, &frames[1].1, &packets[1..]);
    }

    #[test]
    fn fin_syn_rst_and_pure_acks_are_written_alone_and_keep_the_flow_in_order() {
        for flag in ["fin", "syn", "rst", "pure-ack"] {
            let mut segs = run(1000, 1000, 5);
            match flag {
                "fin" => segs[2].fin = true,
                "syn" => segs[2].syn = true,
                "rst" => segs[2].rst = true,
                _ => {
                    segs[2].len = 0;
                    for s in &mut segs[3..] {
                        s.seq -= 1000;
                    }
                }
            }
            let packets = built(&segs);
            let (frames, counts) = coalesce(&packets);
            assert_eq!(frames.len(), 3, "{flag}");
            assert_eq!(counts.packets, 5, "{flag}");
            check_super(frames[0].0, &frames[0].1, &packets[..2]);
            assert_eq!(frames[1], (VnetHeader::NONE, packets[2].clone()), "{flag}");
            check_super(frames[2].0, &frames[2].1, &packets[3..]);
        }
    }

    #[test]
    fn differing_options_ack_window_ttl_or_ids_do_not_merge() {
        type Change = fn(&mut Seg);
        let changes: [(&str, Change); 7] = [
            ("timestamp", |s| s.ts = Some(1001)),
            ("no options", |s| s.ts = None),
            ("ack", |s| s.ack += 1),
            ("window", |s| s.window += 1),
            ("ttl", |s| s.ttl -= 1),
            ("df", |s| s.df = false),
            ("id without df", |s| s.id += 5),
        ];
        for (what, change) in changes {
            let mut segs = run(1000, 1000, 2);
            if what == "id without df" {
                segs[0].df = false;
                segs[1].df = false;
            }
            change(&mut segs[1]);
            let packets = built(&segs);
            let (frames, counts) = coalesce(&packets);
            assert_eq!(frames.len(), 2, "{what}");
            assert_eq!(counts.coalesced, 0, "{what}");
            for (frame, packet) in frames.iter().zip(&packets) {
                assert_eq!(frame, &(VnetHeader::NONE, packet.clone()), "{what}");
            }
        }
        // Without DF, consecutive IDs merge; with DF, IDs do not matter.
        let mut segs = run(1000, 1000, 3);
        for s in &mut segs {
            s.df = false;
        }
        let (frames, _) = coalesce(&built(&segs));
        assert_eq!(frames.len(), 1);
        check_super(frames[0].0, &frames[0].1, &built(&segs));
        let mut segs = run(1000, 1000, 2);
        segs[1].id = 999;
        let (frames, _) = coalesce(&built(&segs));
        assert_eq!(frames.len(), 1);
    }

    #[test]
    fn ipv6_segments_coalesce_with_gso_tcpv6() {
        let segs: Vec<Seg> = run(7, 1300, 3)
            .into_iter()
            .map(|s| Seg { v6: true, ..s })
            .collect();
        let packets = built(&segs);
        let (frames, counts) = coalesce(&packets);
        assert_eq!(frames.len(), 1);
        assert_eq!(counts.coalesced, 3);
        assert_eq!(frames[0].0.gso_type, GSO_TCPV6);
        check_super(frames[0].0, &frames[0].1, &packets);
        // A different hop limit or flow does not merge.
        let mut other = segs.clone();
        other[1].ttl = 1;
        assert_eq!(coalesce(&built(&other)).0.len(), 3);
    }

    #[test]
    fn a_short_segment_is_the_last_one() {
        let mut segs = run(1000, 1000, 2);
        segs.push(Seg {
            id: 2,
            ..Seg::new(3000, 500)
        });
        segs.push(Seg {
            id: 3,
            ..Seg::new(3500, 1000)
        });
        let packets = built(&segs);
        let (frames, _) = coalesce(&packets);
        assert_eq!(frames.len(), 2);
        check_super(frames[0].0, &frames[0].1, &packets[..3]);
        assert_eq!(frames[1], (VnetHeader::NONE, packets[3].clone()));
        // A longer segment after the first does not join.
        let segs = [Seg::new(0, 500), Seg::new(500, 1000)];
        assert_eq!(coalesce(&built(&segs)).0.len(), 2);
    }

    #[test]
    fn a_super_packet_stays_within_64_kib() {
        let segs = run(0, 1400, 50);
        let packets = built(&segs);
        let (frames, counts) = coalesce(&packets);
        // 52 header bytes + 46 × 1400 = 64 452; one more would be 65 852.
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].1.len(), 52 + 46 * 1400);
        assert!(frames.iter().all(|(_, p)| p.len() <= MAX_PACKET));
        assert_eq!((counts.packets, counts.coalesced), (50, 50));
        check_super(frames[0].0, &frames[0].1, &packets[..46]);
        check_super(frames[1].0, &frames[1].1, &packets[46..]);
    }

    #[test]
    fn non_tcp_and_corrupted_segments_are_written_as_they_are() {
        let udp = {
            let b = etherparse::PacketBuilder::ipv4(SRC.octets(), VIP.octets(), 64).udp(1, 2);
            let mut v = Vec::new();
            b.write(&mut v, &[1, 2, 3]).unwrap();
            v
        };
        let (frames, counts) = coalesce(&[udp.clone(), udp.clone()]);
        assert_eq!(frames, vec![(VnetHeader::NONE, udp.clone()); 2]);
        assert_eq!((counts.writes, counts.coalesced), (2, 0));
        assert!(frames.iter().all(|(h, _)| h.gso_type == GSO_NONE));

        // A corrupted segment ends the super-packet and is written alone (the kernel then
        // drops it); the next one starts afresh.
        let mut segs = run(1000, 1000, 5);
        segs[2].corrupt = true;
        let packets = built(&segs);
        let (frames, _) = coalesce(&packets);
        assert_eq!(frames.len(), 3);
        check_super(frames[0].0, &frames[0].1, &packets[..2]);
        assert_eq!(frames[1], (VnetHeader::NONE, packets[2].clone()));
        check_super(frames[2].0, &frames[2].1, &packets[3..]);
        // A corrupted first segment is never merged into.
        let mut segs = run(1000, 1000, 3);
        segs[0].corrupt = true;
        let packets = built(&segs);
        let (frames, _) = coalesce(&packets);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], (VnetHeader::NONE, packets[0].clone()));
        check_super(frames[1].0, &frames[1].1, &packets[1..]);
    }

    #[test]
    fn ip_options_fragments_and_extension_headers_are_not_merged() {
        let packets = built(&run(1000, 1000, 3));
        // IPv4 with an options word (IHL 6): a packet of its own.
        let mut with_options = packets[1].clone();
        with_options.splice(20..20, [1u8, 1, 1, 0]);
        with_options[0] = 0x46;
        let total = (with_options.len() as u16).to_be_bytes();
        with_options[2..4].copy_from_slice(&total);
        // A later fragment of the flow (no ports): closes every open item.
        let mut fragment = packets[2].clone();
        fragment[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        let (frames, _) = coalesce(&[
            packets[0].clone(),
            with_options.clone(),
            fragment.clone(),
            packets[2].clone(),
        ]);
        assert_eq!(frames.len(), 4);
        assert!(frames.iter().all(|(h, _)| *h == VnetHeader::NONE));
        // Segments after a later fragment do not join what came before it.
        let (frames, _) = coalesce(&[packets[0].clone(), fragment, packets[1].clone()]);
        assert_eq!(frames.len(), 3);
    }

    #[test]
    fn full_and_bad_lengths_are_refused_without_change() {
        let packets = built(&run(0, 100, 3));
        let mut c = Coalescer::new(1);
        c.push(&packets[0]).unwrap();
        c.push(&packets[1]).unwrap(); // merged: no new slot needed
        let other = Seg {
            port: 1,
            ..Seg::new(0, 100)
        }
        .build();
        assert_eq!(c.push(&other), Err(PushError::Full));
        assert_eq!(c.push(&[]), Err(PushError::BadLength));
        assert_eq!(
            c.push(&vec![0x45; MAX_PACKET + 1]),
            Err(PushError::BadLength)
        );
        let mut n = 0;
        let counts = c.flush(&mut |_| {
            n += 1;
            Err(io::Error::other("refused"))
        });
        assert_eq!(n, 1);
        assert_eq!(
            counts,
            FlushCounts {
                failed_writes: 1,
                failed_packets: 2,
                ..FlushCounts::default()
            }
        );
        c.push(&other).unwrap();
        assert_eq!(c.pending(), 1);
    }

    #[test]
    fn garbage_never_panics() {
        let mut c = Coalescer::new(4);
        let seed = built(&run(0, 64, 1)).remove(0);
        for cut in 0..seed.len() {
            for flip in [0x00u8, 0xFF, 0x0F, 0xF0] {
                let mut p = seed[..cut.max(1)].to_vec();
                if let Some(b) = p.get_mut(cut / 2) {
                    *b ^= flip;
                }
                if c.push(&p) == Err(PushError::Full) {
                    c.flush(&mut |_| Ok(()));
                }
            }
        }
        c.flush(&mut |_| Ok(()));
    }
}
