//! Egress SNAT (Ananta, Patel et al., SIGCOMM 2013, §3.5): a backend's outbound connections leave
//! with the source rewritten to a shared SNAT address (usually the VIP) and a port from ranges of
//! that address's port space owned by the backend. Replies come back to the SNAT address through
//! ECMP to *any* mux, which encapsulates them to the owner of the destination port's range.
//!
//! Three pieces live here, all pure (no I/O, no clocks: time is passed in as `now`, monotonic
//! nanoseconds):
//! - [`SnatConfig`]: one `[[snat]]` section of the config (address, port space, range size, idle
//!   timeouts) and its validation.
//! - [`PortRanges`]: which backend owns which port range, computed identically by every mux and
//!   every agent from the config and the backend set, with no coordination.
//! - [`SnatTable`]: the agent's NAT table, which rewrites a backend's outbound packets and the
//!   replies, in place.
//!
//! **Port space.** The ports `first_port..=last_port` are cut into aligned ranges of `range_size`
//! (a power of two) ports: range `k` covers `k·range_size ..= (k+1)·range_size − 1`. Only ranges
//! lying *wholly* inside `first_port..=last_port` are used; a partial range at either end is left
//! out, so that a mux finds a port's range with one shift. Port 0 is never used (`first_port` is at
//! least 1, so the range holding port 0 is never whole). With the defaults (1024..=65535, ranges
//! of 8) the space is ranges 128..8192: 8064 ranges, 64 512 ports.
//!
//! **Allocation** is rendezvous (highest-random-weight) hashing per range: the owner of range `k`
//! is the backend with the largest `xxh3(k as u32 big-endian ‖ identity, SNAT_RANGE_SEED)`, where a
//! backend's identity is a family tag (4 or 6) then its address octets, as in `maglev`. Ties
//! (never seen with 64-bit scores) go to the lowest address. Consequences:
//! - The order of the backends and duplicates do not matter: the result is a function of the set.
//! - When a backend joins, it takes exactly the ranges for which it now has the highest score, from
//!   whoever held them; no other range moves. When one leaves, only its ranges move, each to the
//!   runner-up. So existing translations of the other backends survive a backend set change.
//! - The expected share of every backend is equal (binomial spread around `ranges / N`).
//!
//! **Invariants.**
//! - [`PortRanges`] and its [`PortRanges::fingerprint`] are pure functions of the SNAT address, the
//!   port space and the *set* of backends, hashed with fixed seeds (never `std`'s hashers), so
//!   muxes and agents of one fleet agree; a golden test pins the fingerprint.
//! - [`PortRanges::owner`] is one shift, one subtraction and one array index.
//! - [`SnatTable`] allocates only in [`SnatTable::new`]; translating a packet never allocates.
//! - [`SnatTable`] never hands out a port outside the ranges it was given, so never another
//!   backend's port; at most one live mapping per (protocol, SNAT port, remote address, remote
//!   port), so the reply lookup is exact.
//! - No packet input panics: malformed, truncated, fragmented, non-TCP/UDP or misaddressed packets
//!   give a [`SnatError`], and a packet that gives an error is left unchanged.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use crate::time::nanos;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::flow::{PROTO_TCP, PROTO_UDP};
use crate::hash::{FINGERPRINT_SEED, xxh3};

/// Seed of the rendezvous score of (range, backend) (ASCII "snatrnge"). Changing it moves almost
/// every range to another backend: muxes and agents of two versions would then disagree.
pub const SNAT_RANGE_SEED: u64 = 0x736e_6174_726e_6765;
/// Seed of the agent table's outbound index (ASCII "snat-out"). Local to one agent.
pub const SNAT_OUT_SEED: u64 = 0x736e_6174_2d6f_7574;
/// Seed of the agent table's inbound (reply) index (ASCII "snat-inb"). Local to one agent.
pub const SNAT_IN_SEED: u64 = 0x736e_6174_2d69_6e62;

/// Default first port of the SNAT port space: the ports below are the well-known ones.
pub const DEFAULT_FIRST_PORT: u16 = 1024;
/// Default last port of the SNAT port space.
pub const DEFAULT_LAST_PORT: u16 = 65535;
/// Default range size, as in Ananta: 8 ports.
pub const DEFAULT_RANGE_SIZE: u16 = 8;
/// The largest range size: half the port space.
pub const MAX_RANGE_SIZE: u16 = 32768;
/// Default idle timeout of a TCP mapping, in seconds (RFC 5382 asks for at least 2 h 4 min for
/// established connections; Ananta and cloud NATs use 4 minutes).
pub const DEFAULT_TCP_IDLE_SECONDS: u32 = 240;
/// Default idle timeout of a UDP mapping, in seconds (RFC 4787 REQ-5 asks for at least 2 minutes,
/// but DNS-heavy egress wants ports back sooner; 30 s is the common cloud default).
pub const DEFAULT_UDP_IDLE_SECONDS: u32 = 30;
/// Idle timeout of a TCP mapping once the connection is over (a RST, or a FIN each way), unless
/// `tcp_idle` is shorter. Long enough for the last ACK and a few retransmissions.
pub const TCP_CLOSED_IDLE: Duration = Duration::from_secs(10);
/// The most backends [`PortRanges`] distinguishes (an owner is a `u16` index, one value of which
/// means "no owner"). Backends beyond this, in address order, get no range.
pub const MAX_SNAT_BACKENDS: usize = u16::MAX as usize;
/// The largest [`SnatTable`] capacity; larger requests are clamped.
pub const MAX_TABLE_CAPACITY: usize = 1 << 24;

/// One `[[snat]]` section: a SNAT address, its port space and range size, and idle timeouts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnatConfig {
    /// The shared source address of the backends' outbound traffic (usually a VIP).
    pub address: IpAddr,
    /// First port of the space (default 1024); at least 1.
    #[serde(default = "default_first_port")]
    pub first_port: u16,
    /// Last port of the space (default 65535).
    #[serde(default = "default_last_port")]
    pub last_port: u16,
    /// Ports per range: a power of two in 1..=32768 (default 8). Only whole aligned ranges inside
    /// `first_port..=last_port` are used.
    #[serde(default = "default_range_size")]
    pub range_size: u16,
    /// Idle timeout of a TCP mapping, in seconds (default 240).
    #[serde(default = "default_tcp_idle_seconds")]
    pub tcp_idle_seconds: u32,
    /// Idle timeout of a UDP mapping, in seconds (default 30).
    #[serde(default = "default_udp_idle_seconds")]
    pub udp_idle_seconds: u32,
}

fn default_first_port() -> u16 {
    DEFAULT_FIRST_PORT
}
fn default_last_port() -> u16 {
    DEFAULT_LAST_PORT
}
fn default_range_size() -> u16 {
    DEFAULT_RANGE_SIZE
}
fn default_tcp_idle_seconds() -> u32 {
    DEFAULT_TCP_IDLE_SECONDS
}
fn default_udp_idle_seconds() -> u32 {
    DEFAULT_UDP_IDLE_SECONDS
}

impl SnatConfig {
    /// A config for `address` with every other field at its default.
    #[must_use]
    pub fn new(address: IpAddr) -> Self {
        Self {
            address,
            first_port: DEFAULT_FIRST_PORT,
            last_port: DEFAULT_LAST_PORT,
            range_size: DEFAULT_RANGE_SIZE,
            tcp_idle_seconds: DEFAULT_TCP_IDLE_SECONDS,
            udp_idle_seconds: DEFAULT_UDP_IDLE_SECONDS,
        }
    }

    /// Checks the section; `at` is its path (such as `snat[0]`), and every problem is reported
    /// through `fail(field, reason)`, as [`crate::config::Config::validate`] does.
    pub fn validate(&self, at: &str, fail: &mut impl FnMut(String, String)) {
        let a = self.address;
        let unusable = if a.is_unspecified() {
            Some("the unspecified address")
        } else if a.is_multicast() {
            Some("a multicast address")
        } else if a == IpAddr::V4(Ipv4Addr::BROADCAST) {
            Some("the broadcast address")
        } else if let IpAddr::V6(v6) = a
            && v6.to_ipv4_mapped().is_some()
        {
            Some("an IPv4-mapped IPv6 address; write the IPv4 address instead")
        } else {
            None
        };
        if let Some(why) = unusable {
            fail(
                format!("{at}.address"),
                format!("{a} is {why}; it cannot be a SNAT source address"),
            );
        }
        let rs = self.range_size;
        let range_size_ok = if rs == 0 {
            fail(
                format!("{at}.range_size"),
                "range_size 0: a range must hold at least one port".into(),
            );
            false
        } else if rs > MAX_RANGE_SIZE {
            fail(
                format!("{at}.range_size"),
                format!("range_size {rs} is above the maximum {MAX_RANGE_SIZE}"),
            );
            false
        } else if !rs.is_power_of_two() {
            let below = 1u16 << (15 - rs.leading_zeros());
            fail(
                format!("{at}.range_size"),
                format!(
                    "range_size {rs} is not a power of two (nearest: {below} or {}); ranges must be aligned so a mux finds a port's range with one shift",
                    below * 2
                ),
            );
            false
        } else {
            true
        };
        let ports_ok = if self.first_port == 0 {
            fail(
                format!("{at}.first_port"),
                "port 0 cannot be a source port; first_port must be at least 1".into(),
            );
            false
        } else if self.first_port > self.last_port {
            fail(
                format!("{at}.first_port"),
                format!(
                    "first_port {} is above last_port {}",
                    self.first_port, self.last_port
                ),
            );
            false
        } else {
            true
        };
        if range_size_ok && ports_ok && self.range_indices().is_empty() {
            fail(
                format!("{at}.range_size"),
                format!(
                    "ports {}..={} hold no whole aligned range of {rs} ports (range k covers k*{rs} ..= (k+1)*{rs}-1); widen the ports or use a smaller range_size",
                    self.first_port, self.last_port
                ),
            );
        }
        for (field, seconds) in [
            ("tcp_idle_seconds", self.tcp_idle_seconds),
            ("udp_idle_seconds", self.udp_idle_seconds),
        ] {
            if seconds == 0 {
                fail(
                    format!("{at}.{field}"),
                    "an idle timeout of 0 s would expire every mapping at once; use at least 1"
                        .into(),
                );
            }
        }
    }

    /// The indices `k` of the whole aligned ranges inside `first_port..=last_port` (port 0
    /// excluded); empty for an invalid range size or port bounds.
    #[must_use]
    pub fn range_indices(&self) -> std::ops::Range<u32> {
        let rs = u32::from(self.range_size);
        if !rs.is_power_of_two() || self.first_port > self.last_port {
            return 0..0;
        }
        let start = u32::from(self.first_port.max(1)).div_ceil(rs);
        let end = (u32::from(self.last_port) + 1) / rs;
        if start < end { start..end } else { 0..0 }
    }

    /// The ports actually used: from the first port of the first whole range to the last port of
    /// the last one. `None` when there is no whole range.
    #[must_use]
    pub fn port_space(&self) -> Option<RangeInclusive<u16>> {
        let k = self.range_indices();
        if k.is_empty() {
            return None;
        }
        let rs = u32::from(self.range_size);
        Some(port_of(k.start * rs)..=port_of(k.end * rs - 1))
    }

    /// The TCP idle timeout.
    #[must_use]
    pub fn tcp_idle(&self) -> Duration {
        Duration::from_secs(u64::from(self.tcp_idle_seconds))
    }

    /// The UDP idle timeout.
    #[must_use]
    pub fn udp_idle(&self) -> Duration {
        Duration::from_secs(u64::from(self.udp_idle_seconds))
    }
}

/// A port number computed from range arithmetic that keeps it below 65536.
fn port_of(n: u32) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// The identity bytes of an address: a family tag (4 or 6) then the octets, as `maglev` hashes a
/// backend. Returns the length used.
fn write_identity(address: IpAddr, buf: &mut [u8; 17]) -> usize {
    match address {
        IpAddr::V4(a) => {
            buf[0] = 4;
            buf[1..5].copy_from_slice(&a.octets());
            5
        }
        IpAddr::V6(a) => {
            buf[0] = 6;
            buf[1..17].copy_from_slice(&a.octets());
            17
        }
    }
}

/// Owner value of a range that has none (no backends).
const NO_OWNER: u16 = u16::MAX;

/// Which backend owns which port range of one SNAT address, for one backend set.
///
/// Built off the hot path (it hashes every (range, backend) pair: about 8064·N xxh3 calls with
/// the default space); [`PortRanges::owner`] is then O(1). See the module docs for the hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRanges {
    address: IpAddr,
    range_size: u16,
    /// log2 of the range size: a port's range is `port >> shift`.
    shift: u32,
    /// Index `k` of the first range of the space.
    first_range: u32,
    /// Owner of each range of the space (index into `backends`), or [`NO_OWNER`].
    owners: Vec<u16>,
    /// The backends, sorted and without duplicates.
    backends: Vec<IpAddr>,
}

impl PortRanges {
    /// Allocates the ranges of `config`'s space among `backends`.
    ///
    /// The order of `backends` does not matter and duplicates are ignored; with no backends no
    /// range has an owner. `config` should have passed [`SnatConfig::validate`]; if it has not,
    /// its space may be empty (every [`Self::owner`] is then `None`), but nothing panics.
    #[must_use]
    pub fn build(config: &SnatConfig, backends: &[IpAddr]) -> PortRanges {
        let mut backends = backends.to_vec();
        backends.sort_unstable();
        backends.dedup();
        backends.truncate(MAX_SNAT_BACKENDS);
        let indices = config.range_indices();
        let shift = if indices.is_empty() {
            0
        } else {
            u32::from(config.range_size).trailing_zeros()
        };
        // Each backend's hash input: the range number (4 bytes, rewritten per range), then its
        // identity.
        let mut inputs: Vec<([u8; 21], usize)> = backends
            .iter()
            .map(|&b| {
                let mut id = [0u8; 17];
                let len = write_identity(b, &mut id);
                let mut buf = [0u8; 21];
                buf[4..4 + len].copy_from_slice(&id[..len]);
                (buf, 4 + len)
            })
            .collect();
        let owners = indices
            .clone()
            .map(|k| {
                let mut best = NO_OWNER;
                let mut best_score = 0u64;
                for (i, (buf, len)) in inputs.iter_mut().enumerate() {
                    buf[..4].copy_from_slice(&k.to_be_bytes());
                    let score = xxh3(&buf[..*len], SNAT_RANGE_SEED);
                    if best == NO_OWNER || score > best_score {
                        // `backends` holds at most MAX_SNAT_BACKENDS, so `i < NO_OWNER`.
                        best = u16::try_from(i).unwrap_or(NO_OWNER);
                        best_score = score;
                    }
                }
                best
            })
            .collect();
        PortRanges {
            address: config.address,
            range_size: if indices.is_empty() {
                0
            } else {
                config.range_size
            },
            shift,
            first_range: indices.start,
            owners,
            backends,
        }
    }

    /// The backend that owns `port`'s range: one array index. `None` outside the space or when
    /// there are no backends.
    #[inline]
    #[must_use]
    pub fn owner(&self, port: u16) -> Option<IpAddr> {
        self.owner_index(port)
            .and_then(|i| self.backends.get(usize::from(i)).copied())
    }

    /// The owner of `port`'s range as an index into [`Self::backends`].
    #[inline]
    #[must_use]
    pub fn owner_index(&self, port: u16) -> Option<u16> {
        let k = (u32::from(port) >> self.shift).checked_sub(self.first_range)?;
        let owner = *self.owners.get(k as usize)?;
        (owner != NO_OWNER).then_some(owner)
    }

    /// The backends, sorted by address (IPv4 before IPv6), without duplicates.
    #[must_use]
    pub fn backends(&self) -> &[IpAddr] {
        &self.backends
    }

    /// The SNAT address these ranges belong to.
    #[must_use]
    pub fn address(&self) -> IpAddr {
        self.address
    }

    /// Ports per range (0 when the space is empty).
    #[must_use]
    pub fn range_size(&self) -> u16 {
        self.range_size
    }

    /// The number of ranges of the space.
    #[must_use]
    pub fn range_count(&self) -> usize {
        self.owners.len()
    }

    /// Ranges owned by each backend, in the order of [`Self::backends`].
    #[must_use]
    pub fn range_counts(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.backends.len()];
        for &o in &self.owners {
            if let Some(c) = counts.get_mut(usize::from(o)) {
                *c += 1;
            }
        }
        counts
    }

    /// The port ranges `backend` owns, sorted, one per aligned range (adjacent ranges are not
    /// merged). Empty for an address that is not a backend.
    ///
    /// Inclusive ranges, because the last range of the port space ends at 65535, and an
    /// exclusive `Range<u16>` cannot say "up to and including 65535".
    #[must_use]
    pub fn ranges_of(&self, backend: IpAddr) -> Vec<RangeInclusive<u16>> {
        let Ok(index) = self.backends.binary_search(&backend) else {
            return Vec::new();
        };
        let rs = u32::from(self.range_size);
        self.owners
            .iter()
            .zip(self.first_range..)
            .filter(|&(&o, _)| usize::from(o) == index)
            .map(|(_, k)| port_of(k * rs)..=port_of((k + 1) * rs - 1))
            .collect()
    }

    /// A 64-bit fingerprint of the mapping port → owner: xxh3 ([`FINGERPRINT_SEED`]) over
    /// `b"snat-v1"`, the SNAT address identity (family tag, octets), the range size, the first
    /// range index and the range count (u32 little-endian each), then for every range in order the
    /// owner's identity, or a single 0 byte for none. Two nodes with equal fingerprints send every
    /// reply port to the same backend.
    #[must_use]
    pub fn fingerprint(&self) -> u64 {
        let ids: Vec<([u8; 17], usize)> = self
            .backends
            .iter()
            .map(|&b| {
                let mut buf = [0u8; 17];
                let len = write_identity(b, &mut buf);
                (buf, len)
            })
            .collect();
        let mut hasher = Xxh3::with_seed(FINGERPRINT_SEED);
        hasher.update(b"snat-v1");
        let mut own = [0u8; 17];
        let len = write_identity(self.address, &mut own);
        hasher.update(&own[..len]);
        hasher.update(&u32::from(self.range_size).to_le_bytes());
        hasher.update(&self.first_range.to_le_bytes());
        hasher.update(
            &u32::try_from(self.owners.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        for &o in &self.owners {
            match ids.get(usize::from(o)) {
                Some((bytes, len)) => hasher.update(&bytes[..*len]),
                None => hasher.update(&[0]),
            }
        }
        hasher.digest()
    }
}

/// Sizing and idle timeouts of a [`SnatTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatTableConfig {
    /// The most live mappings; clamped to 1..=[`MAX_TABLE_CAPACITY`]. About 100 bytes each.
    pub capacity: usize,
    /// Idle time after which a TCP mapping expires (shortened to [`TCP_CLOSED_IDLE`] once the
    /// connection is over).
    pub tcp_idle: Duration,
    /// Idle time after which a UDP mapping expires.
    pub udp_idle: Duration,
}

impl Default for SnatTableConfig {
    fn default() -> Self {
        Self {
            capacity: 1 << 16,
            tcp_idle: Duration::from_secs(u64::from(DEFAULT_TCP_IDLE_SECONDS)),
            udp_idle: Duration::from_secs(u64::from(DEFAULT_UDP_IDLE_SECONDS)),
        }
    }
}

impl SnatTableConfig {
    /// The timeouts of `config`, with room for `capacity` mappings.
    #[must_use]
    pub fn from_config(config: &SnatConfig, capacity: usize) -> Self {
        Self {
            capacity,
            tcp_idle: config.tcp_idle(),
            udp_idle: config.udp_idle(),
        }
    }
}

/// One translation done by [`SnatTable`]: the three endpoints of the mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    /// IP protocol number (6 or 17).
    pub protocol: u8,
    /// The backend's own address and port (the source before an outbound translation, the
    /// destination after an inbound one).
    pub backend: SocketAddr,
    /// The SNAT address and port the remote end sees.
    pub snat: SocketAddr,
    /// The remote end.
    pub remote: SocketAddr,
    /// Whether this packet created the mapping.
    pub new_mapping: bool,
}

/// Why a packet was not translated. The packet is unchanged. Small and `Copy`: the caller counts
/// it and drops the packet (or, for [`SnatError::NoMapping`], may hand it to the host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum SnatError {
    /// The packet ends before a header or a length field says it should.
    #[error("truncated packet: {needed} bytes needed, {found} present")]
    Truncated {
        /// Bytes needed from the start of the packet.
        needed: usize,
        /// Bytes present.
        found: usize,
    },
    /// A header field is impossible (such as an IPv4 header length below 20 bytes).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The version nibble is neither 4 nor 6.
    #[error("not an IP packet (version {0})")]
    NotIp(u8),
    /// The packet's family is not the SNAT address's: a translation in place cannot change it.
    #[error("the packet's IP family differs from the SNAT address's")]
    FamilyMismatch,
    /// A fragment (IPv4 MF or offset, IPv6 fragment header): later fragments carry no ports, so
    /// fragments are not translated.
    #[error("fragments are not translated")]
    Fragment,
    /// Neither TCP nor UDP (the number is the protocol or the unhandled IPv6 extension header).
    #[error("protocol {0} is not translated (only TCP and UDP)")]
    UnsupportedProtocol(u8),
    /// The outbound source cannot be a backend's address: the SNAT address itself, unspecified,
    /// multicast or broadcast.
    #[error("the source address cannot be a backend's")]
    WrongSource,
    /// The inbound destination is not the SNAT address.
    #[error("the destination is not the SNAT address")]
    WrongDestination,
    /// The inbound destination port is not in this table's ranges (another backend's, or outside
    /// the space).
    #[error("port {0} is not in this backend's ranges")]
    PortNotMine(u16),
    /// No live mapping for the reply's (protocol, port, remote address, remote port).
    #[error("no mapping for this reply")]
    NoMapping,
    /// Every port of this backend's ranges is in use toward this remote endpoint.
    #[error("SNAT ports exhausted toward this remote endpoint")]
    Exhausted,
    /// The table holds `capacity` live mappings.
    #[error("the SNAT table is full")]
    TableFull,
}

/// What a [`SnatTable`] has done, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatCounters {
    /// Mappings created (outbound packets that needed a new SNAT port).
    pub translations: u64,
    /// Outbound packets translated with an existing mapping.
    pub reused: u64,
    /// Replies translated back.
    pub inbound_hits: u64,
    /// Replies with no live mapping ([`SnatError::NoMapping`], [`SnatError::PortNotMine`]).
    pub inbound_misses: u64,
    /// New flows refused because every port was in use toward their remote endpoint.
    pub exhausted: u64,
    /// New flows refused because the table was full.
    pub table_full: u64,
    /// Mappings removed for being idle.
    pub expired: u64,
    /// Packets refused for any other reason (malformed, fragment, protocol, address).
    pub rejected: u64,
    /// Live mappings now (some may be idle past their timeout and not yet reclaimed).
    pub active_mappings: u64,
    /// Distinct SNAT ports used by at least one live mapping now.
    pub ports_in_use: u64,
}

/// Entry flag: a FIN went out.
const FIN_OUT: u8 = 1;
/// Entry flag: a FIN came in.
const FIN_IN: u8 = 2;
/// Entry flag: a RST went either way (cleared by a later packet without RST).
const RST_SEEN: u8 = 4;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// An empty index slot.
const EMPTY: u32 = u32::MAX;
/// Entries examined per new mapping to reclaim idle ones.
const SWEEP_STEP: usize = 4;
/// Entries examined when the table is full before giving up.
const FULL_SWEEP: usize = 256;

/// One mapping. Addresses are 16 bytes, an IPv4 address in the first 4 (a table has one family).
#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    live: bool,
    protocol: u8,
    flags: u8,
    backend_port: u16,
    remote_port: u16,
    snat_port: u16,
    backend: [u8; 16],
    remote: [u8; 16],
    last_seen: u64,
    out_hash: u64,
    in_hash: u64,
}

/// Which of the two indexes.
#[derive(Clone, Copy)]
enum Side {
    Out,
    In,
}

impl Side {
    fn hash(self, e: &Entry) -> u64 {
        match self {
            Side::Out => e.out_hash,
            Side::In => e.in_hash,
        }
    }
}

fn out_hash(protocol: u8, backend: &[u8; 16], bport: u16, remote: &[u8; 16], rport: u16) -> u64 {
    let mut b = [0u8; 37];
    b[0] = protocol;
    b[1..17].copy_from_slice(backend);
    b[17..19].copy_from_slice(&bport.to_be_bytes());
    b[19..35].copy_from_slice(remote);
    b[35..37].copy_from_slice(&rport.to_be_bytes());
    xxh3(&b, SNAT_OUT_SEED)
}

fn in_hash(protocol: u8, snat_port: u16, remote: &[u8; 16], rport: u16) -> u64 {
    let mut b = [0u8; 21];
    b[0] = protocol;
    b[1..3].copy_from_slice(&snat_port.to_be_bytes());
    b[3..19].copy_from_slice(remote);
    b[19..21].copy_from_slice(&rport.to_be_bytes());
    xxh3(&b, SNAT_IN_SEED)
}

/// The agent's NAT table for one SNAT address and the port ranges this backend owns.
///
/// **Mappings** are keyed by (protocol, backend address, backend port, remote address, remote
/// port), like Ananta's. The reply index is keyed by (protocol, SNAT port, remote address, remote
/// port), and the table keeps that tuple unique, so a reply finds exactly one mapping.
///
/// **Port choice.** A rotating cursor walks this backend's ports in order; a new mapping takes the
/// first port from the cursor on whose (protocol, port, remote address, remote port) tuple is not
/// held by a live mapping, and the cursor moves past it. Ports are therefore reused across remote
/// endpoints (one SNAT port serves many remotes at once, as in Ananta) but never twice toward the
/// same remote endpoint. Why this and not "prefer a port already in use": the ranges are owned
/// statically here (Ananta's manager hands them out on demand, so there it pays to use few), and
/// the cursor spreads mappings over all ports, so a (port, remote) tuple is reused as late as
/// possible after its mapping ends, which keeps a new connection clear of the remote's
/// TIME_WAIT for the old one. The cost is bounded: a new flow toward a fresh remote takes one
/// probe; toward a remote that already holds `u` of the `P` ports, the probes skip those `u`, so
/// at worst (all `P` in use toward one remote, before [`SnatError::Exhausted`]) it is `P` index
/// lookups, all without allocating.
///
/// **Expiry.** A mapping idle longer than its protocol's timeout is dead: a lookup that finds it
/// removes it (counted in `expired`) and proceeds as if it were absent, so expiry is exact in time
/// even if nothing sweeps. Space is reclaimed by sweeping: each new mapping examines
/// `SWEEP_STEP` (4) more entries round robin, a full table examines up to 256 before it refuses,
/// and [`SnatTable::expire`] lets the agent sweep more, such as once per batch. TCP mappings drop
/// to [`TCP_CLOSED_IDLE`] once a RST was seen (until a later packet without RST) or a FIN went
/// each way; an outbound SYN (without ACK) on such a mapping starts it afresh with the same port.
///
/// **Layout.** A slab of `capacity` entries with a free list, and two open-addressing indexes
/// (linear probing, at least 2 × capacity slots, deletion by backward shift, so no tombstones and
/// no rehash) from the xxh3 hash of each key to the entry. Everything is allocated by
/// [`SnatTable::new`]. The seeds are fixed: an attacker who knows them could aim remote ports at
/// one probe chain, which costs probes, never correctness.
#[derive(Clone, Debug)]
pub struct SnatTable {
    snat_address: IpAddr,
    snat_octets: [u8; 16],
    v6: bool,
    /// This backend's ports: sorted, merged, inclusive, port 0 removed.
    ranges: Vec<(u16, u16)>,
    total_ports: u32,
    /// Bit `p` set when port `p` is in `ranges`.
    mine: Vec<u64>,
    /// Live mappings per port.
    port_refs: Vec<u32>,
    /// The next port to try: (index into `ranges`, port).
    cursor: (usize, u16),
    entries: Vec<Entry>,
    free: Vec<u32>,
    out_index: Vec<u32>,
    in_index: Vec<u32>,
    sweep_at: usize,
    tcp_idle_ns: u64,
    udp_idle_ns: u64,
    tcp_closed_ns: u64,
    counters: SnatCounters,
}

fn octets16(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

fn address_of(octets: &[u8; 16], v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(*octets))
    } else {
        IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
    }
}

impl SnatTable {
    /// A table translating to `snat_address`, with the ports of `my_ranges` (normally
    /// [`PortRanges::ranges_of`] this backend). The ranges may be in any order and may overlap;
    /// port 0 is never used. This is the only function that allocates.
    #[must_use]
    pub fn new(
        snat_address: IpAddr,
        my_ranges: Vec<RangeInclusive<u16>>,
        config: SnatTableConfig,
    ) -> Self {
        let mut spans: Vec<(u16, u16)> = my_ranges
            .iter()
            .map(|r| ((*r.start()).max(1), *r.end()))
            .filter(|(s, e)| s <= e)
            .collect();
        spans.sort_unstable();
        let mut ranges: Vec<(u16, u16)> = Vec::with_capacity(spans.len());
        for (s, e) in spans {
            match ranges.last_mut() {
                Some(last) if u32::from(s) <= u32::from(last.1) + 1 => last.1 = last.1.max(e),
                _ => ranges.push((s, e)),
            }
        }
        let mut mine = vec![0u64; 65536 / 64];
        let mut total_ports = 0u32;
        for &(s, e) in &ranges {
            for p in s..=e {
                mine[usize::from(p) / 64] |= 1 << (p % 64);
            }
            total_ports += u32::from(e - s) + 1;
        }
        let capacity = config.capacity.clamp(1, MAX_TABLE_CAPACITY);
        let index_len = (capacity * 2).next_power_of_two().max(16);
        let cursor = (0, ranges.first().map_or(0, |r| r.0));
        Self {
            snat_address,
            snat_octets: octets16(snat_address),
            v6: snat_address.is_ipv6(),
            ranges,
            total_ports,
            mine,
            port_refs: vec![0; 65536],
            cursor,
            entries: vec![Entry::default(); capacity],
            free: (0..u32::try_from(capacity).unwrap_or(u32::MAX))
                .rev()
                .collect(),
            out_index: vec![EMPTY; index_len],
            in_index: vec![EMPTY; index_len],
            sweep_at: 0,
            tcp_idle_ns: nanos(config.tcp_idle),
            udp_idle_ns: nanos(config.udp_idle),
            tcp_closed_ns: nanos(config.tcp_idle.min(TCP_CLOSED_IDLE)),
            counters: SnatCounters::default(),
        }
    }

    /// The SNAT address.
    #[must_use]
    pub fn snat_address(&self) -> IpAddr {
        self.snat_address
    }

    /// This table's ports: sorted, merged, inclusive.
    pub fn ranges(&self) -> impl Iterator<Item = RangeInclusive<u16>> + '_ {
        self.ranges.iter().map(|&(s, e)| s..=e)
    }

    /// Whether `port` is one of this table's.
    #[inline]
    #[must_use]
    pub fn is_mine(&self, port: u16) -> bool {
        self.mine[usize::from(port) / 64] >> (port % 64) & 1 == 1
    }

    /// The most live mappings.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// The counters.
    #[must_use]
    pub fn counters(&self) -> SnatCounters {
        self.counters
    }

    /// Translates an outbound packet from the backend (IPv4 or IPv6, starting at the IP header,
    /// TCP or UDP): source address → SNAT address, source port → this mapping's SNAT port, in
    /// place. The IPv4 header checksum and the TCP/UDP checksum are updated incrementally
    /// (RFC 1624), not verified: a wrong checksum stays wrong by the same amount. A UDP checksum of
    /// 0 ("none") stays 0. Bytes after the IP length (link padding) are ignored.
    ///
    /// # Errors
    ///
    /// A [`SnatError`]; the packet is then unchanged.
    pub fn translate_outbound(
        &mut self,
        packet: &mut [u8],
        now: u64,
    ) -> Result<Translation, SnatError> {
        let result = self.outbound(packet, now);
        if let Err(e) = result {
            self.count_error(e);
        }
        result
    }

    /// Translates a reply to the SNAT address back: destination address and port → the backend's,
    /// in place, checksums updated as in [`Self::translate_outbound`]. The mapping is found by the
    /// exact (protocol, destination port, source address, source port).
    ///
    /// # Errors
    ///
    /// A [`SnatError`]; the packet is then unchanged.
    pub fn translate_inbound(
        &mut self,
        packet: &mut [u8],
        now: u64,
    ) -> Result<Translation, SnatError> {
        let result = self.inbound(packet, now);
        if let Err(e) = result {
            self.count_error(e);
        }
        result
    }

    /// Examines up to `budget` entries (round robin) and removes those idle past their timeout.
    /// Returns how many it removed.
    pub fn expire(&mut self, now: u64, budget: usize) -> usize {
        let n = self.entries.len();
        let mut freed = 0;
        for _ in 0..budget.min(n) {
            let i = self.sweep_at;
            self.sweep_at = (i + 1) % n;
            if self.entries[i].live && self.is_expired(&self.entries[i], now) {
                self.remove(i);
                self.counters.expired += 1;
                freed += 1;
            }
        }
        freed
    }

    fn count_error(&mut self, e: SnatError) {
        let c = &mut self.counters;
        match e {
            SnatError::NoMapping | SnatError::PortNotMine(_) => c.inbound_misses += 1,
            SnatError::Exhausted => c.exhausted += 1,
            SnatError::TableFull => c.table_full += 1,
            _ => c.rejected += 1,
        }
    }

    fn is_expired(&self, e: &Entry, now: u64) -> bool {
        let idle = if e.protocol == PROTO_TCP {
            if e.flags & RST_SEEN != 0 || e.flags & (FIN_OUT | FIN_IN) == FIN_OUT | FIN_IN {
                self.tcp_closed_ns
            } else {
                self.tcp_idle_ns
            }
        } else {
            self.udp_idle_ns
        };
        now.saturating_sub(e.last_seen) > idle
    }

    fn outbound(&mut self, packet: &mut [u8], now: u64) -> Result<Translation, SnatError> {
        let p = parse(packet, self.v6)?;
        if p.src == self.snat_octets || !usable_source(&p.src, self.v6) {
            return Err(SnatError::WrongSource);
        }
        let hash = out_hash(p.protocol, &p.src, p.sport, &p.dst, p.dport);
        let found = self.find(Side::Out, hash, |e| {
            e.protocol == p.protocol
                && e.backend_port == p.sport
                && e.remote_port == p.dport
                && e.backend == p.src
                && e.remote == p.dst
        });
        let found = found.and_then(|i| self.drop_if_expired(i, now));
        let (i, new_mapping) = match found {
            Some(i) => {
                self.counters.reused += 1;
                (i, false)
            }
            None => (self.create(&p, hash, now)?, true),
        };
        let e = &mut self.entries[i];
        e.last_seen = now;
        if p.protocol == PROTO_TCP {
            if p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                e.flags = 0;
            }
            if p.tcp_flags & TCP_FIN != 0 {
                e.flags |= FIN_OUT;
            }
            if p.tcp_flags & TCP_RST != 0 {
                e.flags |= RST_SEEN;
            } else {
                e.flags &= !RST_SEEN;
            }
        }
        let snat_port = e.snat_port;
        let snat_octets = self.snat_octets;
        rewrite(packet, &p, self.v6, End::Source, &snat_octets, snat_port);
        Ok(Translation {
            protocol: p.protocol,
            backend: SocketAddr::new(address_of(&p.src, self.v6), p.sport),
            snat: SocketAddr::new(self.snat_address, snat_port),
            remote: SocketAddr::new(address_of(&p.dst, self.v6), p.dport),
            new_mapping,
        })
    }

    fn inbound(&mut self, packet: &mut [u8], now: u64) -> Result<Translation, SnatError> {
        let p = parse(packet, self.v6)?;
        if p.dst != self.snat_octets {
            return Err(SnatError::WrongDestination);
        }
        if !self.is_mine(p.dport) {
            return Err(SnatError::PortNotMine(p.dport));
        }
        let hash = in_hash(p.protocol, p.dport, &p.src, p.sport);
        let found = self.find(Side::In, hash, |e| {
            e.protocol == p.protocol
                && e.snat_port == p.dport
                && e.remote_port == p.sport
                && e.remote == p.src
        });
        let i = found
            .and_then(|i| self.drop_if_expired(i, now))
            .ok_or(SnatError::NoMapping)?;
        let e = &mut self.entries[i];
        e.last_seen = now;
        if p.protocol == PROTO_TCP {
            if p.tcp_flags & TCP_FIN != 0 {
                e.flags |= FIN_IN;
            }
            if p.tcp_flags & TCP_RST != 0 {
                e.flags |= RST_SEEN;
            } else {
                e.flags &= !RST_SEEN;
            }
        }
        let (backend, backend_port) = (e.backend, e.backend_port);
        rewrite(
            packet,
            &p,
            self.v6,
            End::Destination,
            &backend,
            backend_port,
        );
        self.counters.inbound_hits += 1;
        Ok(Translation {
            protocol: p.protocol,
            backend: SocketAddr::new(address_of(&backend, self.v6), backend_port),
            snat: SocketAddr::new(self.snat_address, p.dport),
            remote: SocketAddr::new(address_of(&p.src, self.v6), p.sport),
            new_mapping: false,
        })
    }

    /// `Some(i)` if entry `i` is still live at `now`; otherwise removes it.
    fn drop_if_expired(&mut self, i: usize, now: u64) -> Option<usize> {
        if self.is_expired(&self.entries[i], now) {
            self.remove(i);
            self.counters.expired += 1;
            None
        } else {
            Some(i)
        }
    }

    /// Creates the mapping of an outbound packet that has none; returns its entry.
    fn create(&mut self, p: &Parsed, out_hash: u64, now: u64) -> Result<usize, SnatError> {
        self.expire(now, SWEEP_STEP);
        if self.free.is_empty() {
            self.expire(now, FULL_SWEEP);
        }
        if self.free.is_empty() {
            return Err(SnatError::TableFull);
        }
        let port = self
            .pick_port(p.protocol, &p.dst, p.dport, now)
            .ok_or(SnatError::Exhausted)?;
        let i = self.free.pop().ok_or(SnatError::TableFull)? as usize;
        self.entries[i] = Entry {
            live: true,
            protocol: p.protocol,
            flags: 0,
            backend_port: p.sport,
            remote_port: p.dport,
            snat_port: port,
            backend: p.src,
            remote: p.dst,
            last_seen: now,
            out_hash,
            in_hash: in_hash(p.protocol, port, &p.dst, p.dport),
        };
        self.insert(Side::Out, i);
        self.insert(Side::In, i);
        let refs = &mut self.port_refs[usize::from(port)];
        if *refs == 0 {
            self.counters.ports_in_use += 1;
        }
        *refs += 1;
        self.counters.active_mappings += 1;
        self.counters.translations += 1;
        Ok(i)
    }

    /// The next port from the cursor whose (protocol, port, remote) tuple is free, reclaiming an
    /// expired holder; `None` when every port is taken toward this remote.
    fn pick_port(&mut self, protocol: u8, remote: &[u8; 16], rport: u16, now: u64) -> Option<u16> {
        for _ in 0..self.total_ports {
            let port = self.advance_cursor();
            let hash = in_hash(protocol, port, remote, rport);
            let holder = self.find(Side::In, hash, |e| {
                e.protocol == protocol
                    && e.snat_port == port
                    && e.remote_port == rport
                    && e.remote == *remote
            });
            match holder {
                None => return Some(port),
                Some(i) if self.drop_if_expired(i, now).is_none() => return Some(port),
                Some(_) => {}
            }
        }
        None
    }

    /// Returns the cursor's port and moves the cursor to the next one (wrapping). Only called
    /// when `ranges` is not empty.
    fn advance_cursor(&mut self) -> u16 {
        let (r, port) = self.cursor;
        let last = self.ranges.get(r).map_or(port, |range| range.1);
        self.cursor = if port < last {
            (r, port + 1)
        } else {
            let next = (r + 1) % self.ranges.len().max(1);
            (next, self.ranges.get(next).map_or(0, |range| range.0))
        };
        port
    }

    fn index(&self, side: Side) -> &[u32] {
        match side {
            Side::Out => &self.out_index,
            Side::In => &self.in_index,
        }
    }

    /// The live entry whose key hashes to `hash` and satisfies `matches`.
    fn find(&self, side: Side, hash: u64, matches: impl Fn(&Entry) -> bool) -> Option<usize> {
        let index = self.index(side);
        let mask = index.len() - 1;
        let mut slot = hash as usize & mask;
        // The index always has an empty slot (it is at least twice the capacity); the bound
        // only guards against a broken invariant.
        for _ in 0..index.len() {
            let e = index[slot];
            if e == EMPTY {
                return None;
            }
            let entry = &self.entries[e as usize];
            if side.hash(entry) == hash && matches(entry) {
                return Some(e as usize);
            }
            slot = (slot + 1) & mask;
        }
        None
    }

    /// Puts entry `i` into an index, at the first empty slot of its probe sequence.
    fn insert(&mut self, side: Side, i: usize) {
        let hash = side.hash(&self.entries[i]);
        let index = match side {
            Side::Out => &mut self.out_index,
            Side::In => &mut self.in_index,
        };
        let mask = index.len() - 1;
        let mut slot = hash as usize & mask;
        for _ in 0..index.len() {
            if index[slot] == EMPTY {
                index[slot] = u32::try_from(i).unwrap_or(EMPTY);
                return;
            }
            slot = (slot + 1) & mask;
        }
    }

    /// Removes entry `i` from both indexes (backward-shift deletion), frees its slot and port.
    fn remove(&mut self, i: usize) {
        let entry = self.entries[i];
        if !entry.live {
            return;
        }
        unindex(&mut self.out_index, &self.entries, Side::Out, i);
        unindex(&mut self.in_index, &self.entries, Side::In, i);
        self.entries[i].live = false;
        let refs = &mut self.port_refs[usize::from(entry.snat_port)];
        *refs = refs.saturating_sub(1);
        if *refs == 0 {
            self.counters.ports_in_use = self.counters.ports_in_use.saturating_sub(1);
        }
        self.counters.active_mappings = self.counters.active_mappings.saturating_sub(1);
        if let Ok(i) = u32::try_from(i) {
            self.free.push(i);
        }
    }
}

/// Removes entry `i` from `index` and closes the gap (Knuth's algorithm R for linear probing):
/// every later entry of the cluster whose home slot is not cyclically in (hole, its slot] moves
/// into the hole.
fn unindex(index: &mut [u32], entries: &[Entry], side: Side, i: usize) {
    let mask = index.len() - 1;
    let mut slot = side.hash(&entries[i]) as usize & mask;
    let mut found = false;
    for _ in 0..index.len() {
        match index[slot] {
            EMPTY => return,
            e if e as usize == i => {
                found = true;
                break;
            }
            _ => slot = (slot + 1) & mask,
        }
    }
    if !found {
        return;
    }
    let mut hole = slot;
    let mut j = slot;
    for _ in 0..index.len() {
        j = (j + 1) & mask;
        let e = index[j];
        if e == EMPTY {
            break;
        }
        let home = side.hash(&entries[e as usize]) as usize & mask;
        let stays = if hole <= j {
            hole < home && home <= j
        } else {
            hole < home || home <= j
        };
        if !stays {
            index[hole] = e;
            hole = j;
        }
    }
    index[hole] = EMPTY;
}

/// Whether an outbound source address can be a backend's: not unspecified, multicast or (IPv4)
/// broadcast.
fn usable_source(src: &[u8; 16], v6: bool) -> bool {
    if v6 {
        src != &[0u8; 16] && src[0] != 0xff
    } else {
        let a = Ipv4Addr::new(src[0], src[1], src[2], src[3]);
        !(a.is_unspecified() || a.is_multicast() || a.is_broadcast())
    }
}

/// What translation needs of a packet, all bounds checked.
#[derive(Clone, Copy, Debug)]
struct Parsed {
    protocol: u8,
    /// Offset of the TCP or UDP header.
    l4: usize,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    tcp_flags: u8,
    /// Offset of the TCP or UDP checksum.
    checksum_at: usize,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn need(packet: &[u8], needed: usize) -> Result<(), SnatError> {
    if packet.len() < needed {
        Err(SnatError::Truncated {
            needed,
            found: packet.len(),
        })
    } else {
        Ok(())
    }
}

/// IPv6 extension headers skipped before the transport header: hop-by-hop options and destination
/// options. Routing headers (whose final destination would enter the checksum), fragments and
/// anything else are refused.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_DEST_OPTS: u8 = 60;
const IPV6_FRAGMENT: u8 = 44;
const MAX_IPV6_EXTENSIONS: usize = 8;

/// Parses the IP and TCP/UDP headers of `packet`, which must be of the family `want_v6`.
fn parse(packet: &[u8], want_v6: bool) -> Result<Parsed, SnatError> {
    need(packet, 1)?;
    let version = packet[0] >> 4;
    let v6 = match version {
        4 => false,
        6 => true,
        v => return Err(SnatError::NotIp(v)),
    };
    if v6 != want_v6 {
        return Err(SnatError::FamilyMismatch);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let (protocol, l4, end) = if v6 {
        need(packet, 40)?;
        let end = 40 + usize::from(be16(packet, 4));
        need(packet, end)?;
        src.copy_from_slice(&packet[8..24]);
        dst.copy_from_slice(&packet[24..40]);
        let mut next = packet[6];
        let mut at = 40;
        for _ in 0..MAX_IPV6_EXTENSIONS {
            match next {
                IPV6_HOP_BY_HOP | IPV6_DEST_OPTS => {
                    need(&packet[..end], at + 2)?;
                    let len = (usize::from(packet[at + 1]) + 1) * 8;
                    need(&packet[..end], at + len)?;
                    next = packet[at];
                    at += len;
                }
                IPV6_FRAGMENT => return Err(SnatError::Fragment),
                _ => break,
            }
        }
        if matches!(next, IPV6_HOP_BY_HOP | IPV6_DEST_OPTS) {
            return Err(SnatError::Malformed("too many IPv6 extension headers"));
        }
        (next, at, end)
    } else {
        need(packet, 20)?;
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        if ihl < 20 {
            return Err(SnatError::Malformed("IPv4 header length below 20 bytes"));
        }
        let end = usize::from(be16(packet, 2));
        if end < ihl {
            return Err(SnatError::Malformed(
                "IPv4 total length below its header length",
            ));
        }
        need(packet, end)?;
        if be16(packet, 6) & 0x3fff != 0 {
            return Err(SnatError::Fragment);
        }
        src[..4].copy_from_slice(&packet[12..16]);
        dst[..4].copy_from_slice(&packet[16..20]);
        (packet[9], ihl, end)
    };
    let segment = &packet[..end];
    let (tcp_flags, checksum_at) = match protocol {
        PROTO_TCP => {
            need(segment, l4 + 20)?;
            let offset = usize::from(segment[l4 + 12] >> 4) * 4;
            if offset < 20 {
                return Err(SnatError::Malformed("TCP data offset below 20 bytes"));
            }
            need(segment, l4 + offset)?;
            (segment[l4 + 13], l4 + 16)
        }
        PROTO_UDP => {
            need(segment, l4 + 8)?;
            let len = usize::from(be16(segment, l4 + 4));
            if len < 8 {
                return Err(SnatError::Malformed("UDP length below 8 bytes"));
            }
            need(segment, l4 + len)?;
            (0, l4 + 6)
        }
        other => return Err(SnatError::UnsupportedProtocol(other)),
    };
    Ok(Parsed {
        protocol,
        l4,
        src,
        dst,
        sport: be16(segment, l4),
        dport: be16(segment, l4 + 2),
        tcp_flags,
        checksum_at,
    })
}

/// The end of the packet a translation rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Source,
    Destination,
}

/// The RFC 1624 (eqn. 3) incremental update of a checksum when the 16-bit words `old` become
/// `new`: `HC' = ~(~HC + ~m + m')`, summed in one's complement. Both slices have an even length.
fn checksum_update(checksum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u32::from(!checksum);
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        sum += u32::from(!u16::from_be_bytes([o[0], o[1]]));
        sum += u32::from(u16::from_be_bytes([n[0], n[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves sum <= 0xffff.
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// Rewrites the source or destination address and port of a parsed packet, with its checksums.
fn rewrite(packet: &mut [u8], p: &Parsed, v6: bool, end: End, address: &[u8; 16], port: u16) {
    let (alen, addr_at) = match (v6, end) {
        (false, End::Source) => (4, 12),
        (false, End::Destination) => (4, 16),
        (true, End::Source) => (16, 8),
        (true, End::Destination) => (16, 24),
    };
    let port_at = p.l4 + if end == End::Source { 0 } else { 2 };
    let mut old_address = [0u8; 16];
    old_address[..alen].copy_from_slice(&packet[addr_at..addr_at + alen]);
    let old_port = be16(packet, port_at);
    if !v6 {
        let c = checksum_update(be16(packet, 10), &old_address[..4], &address[..4]);
        packet[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let c = be16(packet, p.checksum_at);
    if !(p.protocol == PROTO_UDP && c == 0) {
        let mut c = checksum_update(c, &old_address[..alen], &address[..alen]);
        c = checksum_update(c, &old_port.to_be_bytes(), &port.to_be_bytes());
        if p.protocol == PROTO_UDP && c == 0 {
            // RFC 768: a computed 0 is sent as all ones; 0 means "no checksum".
            c = 0xffff;
        }
        packet[p.checksum_at..p.checksum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    packet[addr_at..addr_at + alen].copy_from_slice(&address[..alen]);
    packet[port_at..port_at + 2].copy_from_slice(&port.to_be_bytes());
}

impl fmt::Display for Translation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} as {} <-> {}",
            match self.protocol {
                PROTO_TCP => "tcp",
                PROTO_UDP => "udp",
                _ => "?",
            },
            self.backend,
            self.snat,
            self.remote
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    const SECOND: u64 = 1_000_000_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The problems `validate` reports, as (field, reason).
    fn problems(c: &SnatConfig) -> Vec<(String, String)> {
        let mut out = Vec::new();
        c.validate("snat[0]", &mut |f, r| out.push((f, r)));
        out
    }

    fn backends(n: u8) -> Vec<IpAddr> {
        (1..=n).map(|i| IpAddr::from([10, 0, 1, i])).collect()
    }

    fn default_ranges(backends: &[IpAddr]) -> PortRanges {
        PortRanges::build(&SnatConfig::new(ip("198.18.100.1")), backends)
    }

    #[derive(Clone, Copy, Debug)]
    enum Tcp {
        Syn,
        Ack,
        Fin,
        Rst,
    }

    /// A TCP (`Some(flags)`) or UDP (`None`) packet built, with its checksums, by etherparse.
    fn packet(src: SocketAddr, dst: SocketAddr, tcp: Option<Tcp>, payload: &[u8]) -> Vec<u8> {
        let builder = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            _ => panic!("mixed families"),
        };
        let mut out = Vec::new();
        match tcp {
            Some(flags) => {
                let b = builder.tcp(src.port(), dst.port(), 1000, 64240);
                let b = match flags {
                    Tcp::Syn => b.syn(),
                    Tcp::Ack => b.ack(1),
                    Tcp::Fin => b.fin().ack(1),
                    Tcp::Rst => b.rst(),
                };
                b.write_to_vec(&mut out, payload).unwrap();
            }
            None => builder
                .udp(src.port(), dst.port())
                .write_to_vec(&mut out, payload)
                .unwrap(),
        }
        out
    }

    fn udp(src: &str, dst: &str) -> Vec<u8> {
        packet(ep(src), ep(dst), None, b"q")
    }

    /// The offset of the transport checksum in a packet without options or extension headers.
    fn checksum_at(p: &[u8]) -> usize {
        let l4 = if p[0] >> 4 == 4 { 20 } else { 40 };
        let proto = if p[0] >> 4 == 4 { p[9] } else { p[6] };
        l4 + if proto == PROTO_TCP { 16 } else { 6 }
    }

    fn fold(mut sum: u64) -> u16 {
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    fn word_sum(data: &[u8]) -> u64 {
        data.chunks(2)
            .map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
            .sum()
    }

    /// Verifies the IPv4 header checksum and the TCP/UDP checksum from scratch (RFC 1071 sums,
    /// pseudo-headers of RFC 793/768/8200), independently of the incremental code.
    fn checksums_ok(p: &[u8]) -> bool {
        let (pseudo, l4) = if p[0] >> 4 == 4 {
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            if fold(word_sum(&p[..20])) != 0xffff {
                return false;
            }
            let l4 = &p[20..total];
            let mut pseudo = p[12..20].to_vec();
            pseudo.extend_from_slice(&[0, p[9]]);
            pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            if p[9] == PROTO_UDP && l4[6..8] == [0, 0] {
                return true;
            }
            (pseudo, l4)
        } else {
            let l4 = &p[40..40 + usize::from(u16::from_be_bytes([p[4], p[5]]))];
            let mut pseudo = p[8..40].to_vec();
            pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, p[6]]);
            (pseudo, l4)
        };
        fold(word_sum(&pseudo) + word_sum(l4)) == 0xffff
    }

    fn table(snat: &str, ranges: Vec<RangeInclusive<u16>>, capacity: usize) -> SnatTable {
        SnatTable::new(
            ip(snat),
            ranges,
            SnatTableConfig {
                capacity,
                tcp_idle: Duration::from_secs(240),
                udp_idle: Duration::from_secs(30),
            },
        )
    }

    // ---- config ----

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c: SnatConfig = toml::from_str("address = \"198.18.100.1\"").unwrap();
        assert_eq!(c, SnatConfig::new(ip("198.18.100.1")));
        assert!(problems(&c).is_empty());
        assert_eq!(c.range_indices(), 128..8192);
        assert_eq!(c.port_space(), Some(1024..=65535));
        assert_eq!(c.tcp_idle(), Duration::from_secs(240));
        assert_eq!(c.udp_idle(), Duration::from_secs(30));
        let e =
            toml::from_str::<SnatConfig>("address = \"198.18.100.1\"\nrange_sise = 8").unwrap_err();
        assert!(e.to_string().contains("unknown field `range_sise`"), "{e}");
    }

    #[test]
    fn config_validation_names_field_and_reason() {
        let base = SnatConfig::new(ip("198.18.100.1"));
        let one = |c: SnatConfig| {
            let p = problems(&c);
            assert_eq!(p.len(), 1, "{p:?}");
            p.into_iter().next().unwrap()
        };
        let (f, r) = one(SnatConfig {
            range_size: 0,
            ..base.clone()
        });
        assert_eq!(f, "snat[0].range_size");
        assert!(r.contains("at least one port"), "{r}");
        let (f, r) = one(SnatConfig {
            range_size: 12,
            ..base.clone()
        });
        assert_eq!(f, "snat[0].range_size");
        assert!(r.contains("not a power of two (nearest: 8 or 16)"), "{r}");
        let (_, r) = one(SnatConfig {
            range_size: 40000,
            ..base.clone()
        });
        assert!(r.contains("above the maximum 32768"), "{r}");
        let (f, r) = one(SnatConfig {
            first_port: 0,
            ..base.clone()
        });
        assert_eq!(f, "snat[0].first_port");
        assert!(r.contains("port 0"), "{r}");
        let (f, r) = one(SnatConfig {
            first_port: 5000,
            last_port: 4000,
            ..base.clone()
        });
        assert_eq!(f, "snat[0].first_port");
        assert!(r.contains("above last_port 4000"), "{r}");
        // 1025..=1030 holds no whole range of 8 (1024..=1031 sticks out at both ends).
        let (f, r) = one(SnatConfig {
            first_port: 1025,
            last_port: 1038,
            ..base.clone()
        });
        assert_eq!(f, "snat[0].range_size");
        assert!(r.contains("no whole aligned range of 8"), "{r}");
        let (f, _) = one(SnatConfig {
            address: ip("224.0.0.1"),
            ..base.clone()
        });
        assert_eq!(f, "snat[0].address");
        let (f, _) = one(SnatConfig {
            udp_idle_seconds: 0,
            ..base.clone()
        });
        assert_eq!(f, "snat[0].udp_idle_seconds");
        // The largest range size: 1..=65535 holds exactly one whole range, 32768..=65535.
        let big = SnatConfig {
            first_port: 1,
            range_size: 32768,
            ..base.clone()
        };
        assert!(problems(&big).is_empty());
        assert_eq!(big.port_space(), Some(32768..=65535));
        // Partial ranges at the ends are not used.
        let partial = SnatConfig {
            first_port: 1030,
            last_port: 1100,
            ..base
        };
        assert_eq!(partial.port_space(), Some(1032..=1095));
    }

    // ---- port ranges ----

    /// Pins the allocation: if this changes, muxes and agents of two versions disagree on who
    /// owns a port, and replies go to the wrong backend during a rolling upgrade.
    #[test]
    fn golden_fingerprint() {
        let r = default_ranges(&backends(3));
        let owners: Vec<u16> = (0..8)
            .map(|k| r.owner_index(1024 + 8 * k).unwrap())
            .collect();
        assert_eq!(
            owners,
            [2, 0, 1, 1, 2, 0, 2, 1],
            "first owners changed: {owners:?}"
        );
        assert_eq!(
            r.fingerprint(),
            0x23ce_afac_0f7d_9b22,
            "fingerprint changed: {:#x}",
            r.fingerprint()
        );
    }

    #[test]
    fn balance_over_the_default_space() {
        for n in [2u8, 3, 5, 10] {
            let r = default_ranges(&backends(n));
            let counts = r.range_counts();
            let fair = r.range_count() as f64 / f64::from(n);
            for (b, &c) in r.backends().iter().zip(&counts) {
                let off = (f64::from(c) - fair).abs() / fair;
                assert!(
                    off < 0.10,
                    "{n} backends: {b} has {c} ranges, fair {fair:.0}"
                );
            }
            assert_eq!(counts.iter().sum::<u32>() as usize, r.range_count());
        }
    }

    #[test]
    fn order_and_duplicates_do_not_matter() {
        let b = backends(7);
        let a = default_ranges(&b);
        let mut shuffled: Vec<IpAddr> = b.iter().rev().copied().collect();
        shuffled.extend_from_slice(&b[2..4]);
        let c = default_ranges(&shuffled);
        assert_eq!(a, c);
        assert_eq!(a.fingerprint(), c.fingerprint());
        assert_eq!(a.backends(), &b[..]);
    }

    #[test]
    fn ranges_are_aligned_disjoint_and_cover_the_space_once() {
        for (first, last, rs) in [
            (1024, 65535, 8),
            (1030, 40000, 64),
            (1, 65535, 1),
            (1, 65535, 32768),
        ] {
            let config = SnatConfig {
                first_port: first,
                last_port: last,
                range_size: rs,
                ..SnatConfig::new(ip("2001:db8::1"))
            };
            let r = PortRanges::build(&config, &backends(4));
            let space = config.port_space().unwrap();
            let mut seen = vec![0u8; 65536];
            for &b in r.backends() {
                let ranges = r.ranges_of(b);
                assert!(
                    ranges.windows(2).all(|w| w[0].end() < w[1].start()),
                    "sorted"
                );
                for range in ranges {
                    assert_eq!(u32::from(*range.start()) % u32::from(rs), 0, "aligned");
                    assert_eq!(
                        u32::from(*range.end()) - u32::from(*range.start()) + 1,
                        u32::from(rs)
                    );
                    for p in range {
                        seen[usize::from(p)] += 1;
                        assert_eq!(r.owner(p), Some(b));
                    }
                }
            }
            for p in 0..=65535u16 {
                let expected = u8::from(space.contains(&p));
                assert_eq!(seen[usize::from(p)], expected, "port {p}");
                assert_eq!(r.owner(p).is_some(), space.contains(&p), "port {p}");
            }
        }
    }

    #[test]
    fn no_backends_and_invalid_configs_have_no_owner() {
        let r = default_ranges(&[]);
        assert_eq!(r.owner(2000), None);
        assert!(r.ranges_of(ip("10.0.1.1")).is_empty());
        let bad = SnatConfig {
            range_size: 12,
            ..SnatConfig::new(ip("198.18.100.1"))
        };
        let r = PortRanges::build(&bad, &backends(3));
        assert_eq!(r.range_count(), 0);
        assert!((0..=65535).all(|p| r.owner(p).is_none()));
        let r = default_ranges(&backends(3));
        assert_eq!(r.owner(1023), None);
        assert_eq!(r.owner(0), None);
        assert!(r.ranges_of(ip("10.9.9.9")).is_empty());
    }

    /// Rendezvous hashing: adding a backend moves ranges only *to* it; removing one moves only
    /// *its* ranges.
    #[test]
    fn only_the_changed_backend_moves() {
        for n in 1..=12u8 {
            let before = default_ranges(&backends(n));
            let mut more = backends(n);
            let new = IpAddr::from([10, 0, 2, n]);
            more.push(new);
            let after = default_ranges(&more);
            let mut moved = 0;
            for p in (1024..=65535u16).step_by(8) {
                let (a, b) = (before.owner(p), after.owner(p));
                if a != b {
                    assert_eq!(b, Some(new), "port {p} moved from {a:?} to {b:?}");
                    moved += 1;
                }
            }
            // The newcomer's fair share, within the balance bound.
            let fair = before.range_count() as f64 / f64::from(n + 1);
            assert!(
                (f64::from(moved) - fair).abs() < 0.15 * fair,
                "{moved} vs {fair}"
            );
            // Removing a backend: only its ranges move.
            let gone = backends(n)[usize::from(n) / 2];
            let fewer: Vec<IpAddr> = backends(n).into_iter().filter(|&b| b != gone).collect();
            let after = default_ranges(&fewer);
            for p in (1024..=65535u16).step_by(8) {
                if before.owner(p) != after.owner(p) {
                    assert_eq!(before.owner(p), Some(gone), "port {p}");
                }
            }
        }
    }

    // ---- the NAT table ----

    #[test]
    fn outbound_then_reply_restores_and_reuses() {
        let mut t = table("198.18.100.1", vec![2000..=2007], 64);
        let out = packet(
            ep("10.0.1.1:40000"),
            ep("203.0.113.5:443"),
            Some(Tcp::Syn),
            b"",
        );
        let mut p = out.clone();
        let tr = t.translate_outbound(&mut p, 0).unwrap();
        assert!(tr.new_mapping);
        assert_eq!(tr.backend, ep("10.0.1.1:40000"));
        assert_eq!(tr.remote, ep("203.0.113.5:443"));
        assert_eq!(tr.snat, ep("198.18.100.1:2000"));
        assert_eq!(p, packet(tr.snat, tr.remote, Some(Tcp::Syn), b""));
        assert!(checksums_ok(&p));
        let mut reply = packet(tr.remote, tr.snat, Some(Tcp::Ack), b"hi");
        let back = t.translate_inbound(&mut reply, SECOND).unwrap();
        assert_eq!(back.backend, tr.backend);
        assert_eq!(reply, packet(tr.remote, tr.backend, Some(Tcp::Ack), b"hi"));
        // The flow's next packet reuses the mapping.
        let mut again = packet(tr.backend, tr.remote, Some(Tcp::Ack), b"x");
        let tr2 = t.translate_outbound(&mut again, 2 * SECOND).unwrap();
        assert_eq!((tr2.snat, tr2.new_mapping), (tr.snat, false));
        let c = t.counters();
        assert_eq!(
            (
                c.translations,
                c.reused,
                c.inbound_hits,
                c.active_mappings,
                c.ports_in_use
            ),
            (1, 1, 1, 1, 1)
        );
    }

    #[test]
    fn reply_lookup_is_exact() {
        let mut t = table("198.18.100.1", vec![2000..=2007], 64);
        let mut p = udp("10.0.1.1:5000", "203.0.113.5:53");
        let tr = t.translate_outbound(&mut p, 0).unwrap();
        for (from, to) in [
            ("203.0.113.5:54", "198.18.100.1:2000"), // other remote port
            ("203.0.113.6:53", "198.18.100.1:2000"), // other remote address
            ("203.0.113.5:53", "198.18.100.1:2001"), // other SNAT port of mine
        ] {
            let mut r = udp(from, to);
            let before = r.clone();
            assert_eq!(t.translate_inbound(&mut r, 0), Err(SnatError::NoMapping));
            assert_eq!(r, before, "a refused packet is unchanged");
        }
        // Same tuple, other protocol.
        let mut r = packet(tr.remote, tr.snat, Some(Tcp::Ack), b"");
        assert_eq!(t.translate_inbound(&mut r, 0), Err(SnatError::NoMapping));
        let mut r = udp("203.0.113.5:53", "198.18.100.1:3000");
        assert_eq!(
            t.translate_inbound(&mut r, 0),
            Err(SnatError::PortNotMine(3000))
        );
        let mut r = udp("203.0.113.5:53", "198.18.100.2:2000");
        assert_eq!(
            t.translate_inbound(&mut r, 0),
            Err(SnatError::WrongDestination)
        );
        assert_eq!(t.counters().inbound_misses, 5);
        let mut r = udp("203.0.113.5:53", "198.18.100.1:2000");
        assert!(t.translate_inbound(&mut r, 0).is_ok());
    }

    #[test]
    fn ports_are_reused_across_remotes_never_toward_one() {
        // One port: every remote endpoint can use it once.
        let mut t = table("198.18.100.1", vec![4000..=4000], 64);
        let remotes = [
            "203.0.113.1:53",
            "203.0.113.2:53",
            "203.0.113.1:54",
            "203.0.113.3:80",
        ];
        for (i, remote) in remotes.iter().enumerate() {
            let src = format!("10.0.1.1:{}", 5000 + i);
            let tr = t.translate_outbound(&mut udp(&src, remote), 0).unwrap();
            assert_eq!(tr.snat.port(), 4000);
        }
        assert_eq!(t.counters().ports_in_use, 1);
        assert_eq!(t.counters().active_mappings, 4);
        // A second flow toward one of those remotes finds the port taken.
        assert_eq!(
            t.translate_outbound(&mut udp("10.0.1.1:6000", remotes[0]), 0),
            Err(SnatError::Exhausted)
        );
        // Every reply reaches its own flow.
        for (i, remote) in remotes.iter().enumerate() {
            let mut r = udp(remote, "198.18.100.1:4000");
            let tr = t.translate_inbound(&mut r, 0).unwrap();
            assert_eq!(tr.backend.port(), 5000 + i as u16);
        }
    }

    #[test]
    fn exhaustion_with_a_tiny_range() {
        let mut t = table("198.18.100.1", vec![2000..=2001], 64);
        let remote = "203.0.113.5:443";
        let a = t
            .translate_outbound(&mut udp("10.0.1.1:1", remote), 0)
            .unwrap();
        let b = t
            .translate_outbound(&mut udp("10.0.1.1:2", remote), 0)
            .unwrap();
        assert_ne!(a.snat.port(), b.snat.port());
        let mut p = udp("10.0.1.1:3", remote);
        let before = p.clone();
        assert_eq!(t.translate_outbound(&mut p, 0), Err(SnatError::Exhausted));
        assert_eq!(p, before);
        assert_eq!(t.counters().exhausted, 1);
        // The same backend and ports toward another remote: fine.
        assert!(
            t.translate_outbound(&mut udp("10.0.1.1:3", "203.0.113.6:443"), 0)
                .is_ok()
        );
        // No ranges at all: every new flow is refused.
        let mut none = table("198.18.100.1", vec![], 64);
        assert_eq!(
            none.translate_outbound(&mut udp("10.0.1.1:3", remote), 0),
            Err(SnatError::Exhausted)
        );
    }

    #[test]
    fn expiry_frees_ports_and_tcp_lasts_longer() {
        let mut t = table("198.18.100.1", vec![2000..=2000], 64);
        let remote = "203.0.113.5:443";
        t.translate_outbound(&mut udp("10.0.1.1:1", remote), 0)
            .unwrap();
        let syn = packet(ep("10.0.1.1:2"), ep("203.0.113.6:443"), Some(Tcp::Syn), b"");
        t.translate_outbound(&mut syn.clone(), 0).unwrap();
        let later = 31 * SECOND;
        // The UDP mapping is idle past 30 s: its reply misses, and its port is free again.
        let mut r = udp(remote, "198.18.100.1:2000");
        assert_eq!(
            t.translate_inbound(&mut r, later),
            Err(SnatError::NoMapping)
        );
        let tr = t
            .translate_outbound(&mut udp("10.0.1.1:9", remote), later)
            .unwrap();
        assert_eq!(tr.snat.port(), 2000);
        // The TCP mapping lives on (240 s).
        let mut r = packet(
            ep("203.0.113.6:443"),
            ep("198.18.100.1:2000"),
            Some(Tcp::Ack),
            b"",
        );
        assert!(t.translate_inbound(&mut r, later).is_ok());
        let c = t.counters();
        assert_eq!((c.expired, c.active_mappings), (1, 2));
        // Sweeping reclaims idle entries nobody looks up.
        assert_eq!(t.expire(later + 300 * SECOND, 64), 2);
        assert_eq!(t.counters().active_mappings, 0);
        assert_eq!(t.counters().ports_in_use, 0);
    }

    #[test]
    fn closed_tcp_expires_sooner() {
        let mut t = table("198.18.100.1", vec![2000..=2000], 64);
        let (b, r, s) = (
            ep("10.0.1.1:2"),
            ep("203.0.113.6:443"),
            ep("198.18.100.1:2000"),
        );
        t.translate_outbound(&mut packet(b, r, Some(Tcp::Syn), b""), 0)
            .unwrap();
        t.translate_outbound(&mut packet(b, r, Some(Tcp::Fin), b""), 0)
            .unwrap();
        t.translate_inbound(&mut packet(r, s, Some(Tcp::Fin), b""), 0)
            .unwrap();
        let mut last = packet(r, s, Some(Tcp::Ack), b"");
        assert_eq!(
            t.translate_inbound(&mut last, 11 * SECOND),
            Err(SnatError::NoMapping)
        );
        // A RST also ends it.
        t.translate_outbound(&mut packet(b, r, Some(Tcp::Syn), b""), 20 * SECOND)
            .unwrap();
        t.translate_inbound(&mut packet(r, s, Some(Tcp::Rst), b""), 20 * SECOND)
            .unwrap();
        assert_eq!(t.expire(31 * SECOND, 64), 1);
        // A new SYN on a closing mapping starts it afresh.
        t.translate_outbound(&mut packet(b, r, Some(Tcp::Syn), b""), 40 * SECOND)
            .unwrap();
        t.translate_outbound(&mut packet(b, r, Some(Tcp::Rst), b""), 41 * SECOND)
            .unwrap();
        t.translate_outbound(&mut packet(b, r, Some(Tcp::Syn), b""), 42 * SECOND)
            .unwrap();
        assert!(
            t.translate_inbound(&mut packet(r, s, Some(Tcp::Ack), b""), 60 * SECOND)
                .is_ok()
        );
    }

    #[test]
    fn a_full_table_refuses_then_recovers() {
        let mut t = table("198.18.100.1", vec![2000..=2007], 4);
        for i in 0..4 {
            let src = format!("10.0.1.1:{}", 100 + i);
            t.translate_outbound(&mut udp(&src, "203.0.113.5:53"), 0)
                .unwrap();
        }
        assert_eq!(
            t.translate_outbound(&mut udp("10.0.1.1:200", "203.0.113.5:53"), SECOND),
            Err(SnatError::TableFull)
        );
        assert_eq!(t.counters().table_full, 1);
        // Existing flows keep working.
        assert!(
            t.translate_outbound(&mut udp("10.0.1.1:100", "203.0.113.5:53"), SECOND)
                .is_ok()
        );
        assert!(
            t.translate_outbound(&mut udp("10.0.1.1:200", "203.0.113.5:53"), 40 * SECOND)
                .is_ok()
        );
    }

    #[test]
    fn another_backends_port_is_never_used() {
        let ranges = default_ranges(&backends(3));
        let me = backends(3)[1];
        let mut t = SnatTable::new(
            ranges.address(),
            ranges.ranges_of(me),
            SnatTableConfig::default(),
        );
        let mut ports = std::collections::BTreeSet::new();
        for i in 0..30_000u32 {
            let remote = SocketAddr::new(IpAddr::from([203, 0, 113, (i % 7) as u8]), 443);
            let src = SocketAddr::new(me, 1024 + (i % 60_000) as u16);
            let mut p = packet(src, remote, None, b"");
            let tr = t.translate_outbound(&mut p, 0).unwrap();
            assert_eq!(ranges.owner(tr.snat.port()), Some(me));
            ports.insert(tr.snat.port());
        }
        // 30 000 flows over 7 remotes need ~4 300 ports each: the cursor has wrapped once.
        assert_eq!(ports.len(), ranges.ranges_of(me).len() * 8);
        for other in [backends(3)[0], backends(3)[2]] {
            let port = *ranges.ranges_of(other)[0].start();
            let mut r = packet(
                ep("203.0.113.0:443"),
                SocketAddr::new(ranges.address(), port),
                None,
                b"",
            );
            assert_eq!(
                t.translate_inbound(&mut r, 0),
                Err(SnatError::PortNotMine(port))
            );
        }
    }

    #[test]
    fn bad_packets_are_typed_errors() {
        let mut t = table("198.18.100.1", vec![2000..=2007], 64);
        let good = udp("10.0.1.1:5000", "203.0.113.5:53");
        let cases: Vec<(Vec<u8>, SnatError)> = vec![
            (
                udp("198.18.100.1:5000", "203.0.113.5:53"),
                SnatError::WrongSource,
            ),
            (
                udp("0.0.0.0:5000", "203.0.113.5:53"),
                SnatError::WrongSource,
            ),
            (
                udp("[2001:db8::1]:5000", "[2001:db8::2]:53"),
                SnatError::FamilyMismatch,
            ),
            (vec![0x15; 40], SnatError::NotIp(1)),
            (
                {
                    let mut p = good.clone();
                    p[9] = 1; // ICMP
                    p
                },
                SnatError::UnsupportedProtocol(1),
            ),
            (
                {
                    let mut p = good.clone();
                    p[6] = 0x20; // MF
                    p
                },
                SnatError::Fragment,
            ),
            (
                {
                    let mut p = good.clone();
                    p[0] = 0x44;
                    p
                },
                SnatError::Malformed("IPv4 header length below 20 bytes"),
            ),
            (
                {
                    let mut p = good.clone();
                    p[25] = 4; // UDP length 4
                    p
                },
                SnatError::Malformed("UDP length below 8 bytes"),
            ),
        ];
        for (mut p, e) in cases {
            let before = p.clone();
            assert_eq!(t.translate_outbound(&mut p, 0), Err(e));
            assert_eq!(p, before);
        }
        assert_eq!(t.counters().rejected, 8);
        assert_eq!(t.counters().active_mappings, 0);
        // Link padding after the IP length is ignored and left alone.
        let mut padded = good.clone();
        padded.extend_from_slice(&[0xee; 6]);
        t.translate_outbound(&mut padded, 0).unwrap();
        assert_eq!(&padded[good.len()..], &[0xee; 6]);
    }

    #[test]
    fn ipv6_extension_headers() {
        let mut t = table("2001:db8:100::1", vec![2000..=2007], 64);
        let plain = udp("[2001:db8::1]:5000", "[2001:db8::2]:53");
        // Insert an 8-byte destination options header (PadN) before UDP.
        let with_opts = |next_after: u8| {
            let mut p = plain[..40].to_vec();
            p[6] = IPV6_DEST_OPTS;
            let plen = u16::from_be_bytes([p[4], p[5]]) + 8;
            p[4..6].copy_from_slice(&plen.to_be_bytes());
            p.extend_from_slice(&[next_after, 0, 1, 4, 0, 0, 0, 0]);
            p.extend_from_slice(&plain[40..]);
            p
        };
        let mut p = with_opts(PROTO_UDP);
        let tr = t.translate_outbound(&mut p, 0).unwrap();
        assert_eq!(tr.snat.ip(), ip("2001:db8:100::1"));
        let mut expected = with_opts(PROTO_UDP);
        expected[8..24].copy_from_slice(&p[8..24]);
        assert_eq!(&p[..48], &expected[..48]);
        // The checksum is the one of the plain translated packet (options are not covered).
        let translated = packet(tr.snat, tr.remote, None, b"q");
        assert_eq!(&p[48..], &translated[40..]);
        let mut frag = with_opts(IPV6_FRAGMENT);
        assert_eq!(t.translate_outbound(&mut frag, 0), Err(SnatError::Fragment));
        let mut routing = with_opts(43);
        assert_eq!(
            t.translate_outbound(&mut routing, 0),
            Err(SnatError::UnsupportedProtocol(43))
        );
    }

    /// Model check of the indexes: random creates, replies and expiries against a plain map.
    #[test]
    fn matches_a_model_under_churn() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut t = table("198.18.100.1", vec![2000..=2031], 256);
        // (backend port, remote) -> (snat port, last seen)
        let mut model: std::collections::BTreeMap<(u16, u8), (u16, u64)> = Default::default();
        let idle = 30 * SECOND;
        let mut now = 0;
        for _ in 0..20_000 {
            now += next() % (SECOND / 2);
            let bport = 1000 + (next() % 64) as u16;
            let remote = (next() % 8) as u8;
            let src = SocketAddr::new(ip("10.0.1.1"), bport);
            let dst = SocketAddr::new(IpAddr::from([203, 0, 113, remote]), 53);
            if next() % 3 == 0 {
                let key = (bport, remote);
                if let Some(&(port, seen)) = model.get(&key) {
                    let mut r = packet(dst, SocketAddr::new(ip("198.18.100.1"), port), None, b"");
                    let got = t.translate_inbound(&mut r, now);
                    if now - seen > idle {
                        assert_eq!(got, Err(SnatError::NoMapping));
                        model.remove(&key);
                    } else {
                        assert_eq!(got.unwrap().backend, src);
                        model.insert(key, (port, now));
                    }
                }
            } else {
                model.retain(|_, &mut (_, seen)| now - seen <= idle);
                let got = t.translate_outbound(&mut packet(src, dst, None, b""), now);
                match model.get(&(bport, remote)) {
                    Some(&(port, _)) => assert_eq!(got.unwrap().snat.port(), port),
                    None => match got {
                        Ok(tr) => {
                            assert!(
                                model
                                    .iter()
                                    .all(|(&(_, r), &(p, _))| r != remote || p != tr.snat.port())
                            );
                            model.insert((bport, remote), (tr.snat.port(), now));
                        }
                        Err(e) => assert!(matches!(e, SnatError::Exhausted | SnatError::TableFull)),
                    },
                }
                if let Some(v) = model.get_mut(&(bport, remote)) {
                    v.1 = now;
                }
            }
        }
        t.expire(now, 256);
        model.retain(|_, &mut (_, seen)| now - seen <= idle);
        assert_eq!(t.counters().active_mappings as usize, model.len());
    }

    fn endpoint(v6: bool, octets: [u8; 16], first: u8, port: u16) -> SocketAddr {
        let mut o = octets;
        o[0] = first;
        let a = if v6 {
            IpAddr::V6(Ipv6Addr::from(o))
        } else {
            IpAddr::V4(Ipv4Addr::new(first, o[1], o[2], o[3]))
        };
        SocketAddr::new(a, port)
    }

    proptest! {
        #[test]
        fn round_trip_restores_addresses_with_valid_checksums(
            v6 in any::<bool>(),
            tcp in any::<bool>(),
            zero_udp_checksum in any::<bool>(),
            b in any::<[u8; 16]>(),
            r in any::<[u8; 16]>(),
            bport in 1u16..,
            rport in 1u16..,
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            first in 1024u16..65000,
        ) {
            let backend = endpoint(v6, b, 10, bport);
            let remote = endpoint(v6, r, if v6 { 0x24 } else { 198 }, rport);
            let snat = if v6 { ip("2001:db8:100::1") } else { ip("198.18.100.1") };
            let mut t = SnatTable::new(snat, vec![first..=first + 7], SnatTableConfig::default());
            let flags = tcp.then_some(Tcp::Ack);
            let zero = !tcp && !v6 && zero_udp_checksum;
            let mut p = packet(backend, remote, flags, &payload);
            if zero {
                let at = checksum_at(&p);
                p[at..at + 2].fill(0);
            }
            let tr = t.translate_outbound(&mut p, 0).unwrap();
            prop_assert!((first..=first + 7).contains(&tr.snat.port()));
            let mut expected = packet(tr.snat, remote, flags, &payload);
            if zero {
                let at = checksum_at(&expected);
                expected[at..at + 2].fill(0);
            }
            prop_assert_eq!(&p, &expected);
            prop_assert!(checksums_ok(&p));
            let mut reply = packet(remote, tr.snat, flags, &payload);
            let back = t.translate_inbound(&mut reply, 1).unwrap();
            prop_assert_eq!(back.backend, backend);
            prop_assert_eq!(&reply, &packet(remote, backend, flags, &payload));
            prop_assert!(checksums_ok(&reply));
        }

        #[test]
        fn every_truncation_is_an_error(v6 in any::<bool>(), tcp in any::<bool>(), len in 0usize..40) {
            let snat = if v6 { ip("2001:db8:100::1") } else { ip("198.18.100.1") };
            let (b, r, s) = if v6 {
                (ep("[2001:db8::1]:5000"), ep("[2001:db8::2]:53"), ep("[2001:db8:100::1]:2000"))
            } else {
                (ep("10.0.1.1:5000"), ep("203.0.113.5:53"), ep("198.18.100.1:2000"))
            };
            let payload = vec![7u8; len];
            let flags = tcp.then_some(Tcp::Ack);
            let mut t = SnatTable::new(snat, vec![2000..=2000], SnatTableConfig::default());
            let out = packet(b, r, flags, &payload);
            for cut in 0..out.len() {
                let mut p = out[..cut].to_vec();
                prop_assert!(t.translate_outbound(&mut p, 0).is_err(), "cut {}", cut);
                prop_assert_eq!(&p[..], &out[..cut]);
            }
            t.translate_outbound(&mut out.clone(), 0).unwrap();
            let reply = packet(r, s, flags, &payload);
            for cut in 0..reply.len() {
                let mut p = reply[..cut].to_vec();
                prop_assert!(t.translate_inbound(&mut p, 0).is_err(), "cut {}", cut);
                prop_assert_eq!(&p[..], &reply[..cut]);
            }
            prop_assert_eq!(t.counters().active_mappings, 1);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120), v6 in any::<bool>()) {
            let snat = if v6 { ip("2001:db8:100::1") } else { ip("198.18.100.1") };
            let mut t = SnatTable::new(snat, vec![0..=65535], SnatTableConfig { capacity: 8, ..SnatTableConfig::default() });
            let mut p = bytes.clone();
            let _ = t.translate_outbound(&mut p, 0);
            let mut p = bytes;
            let _ = t.translate_inbound(&mut p, 0);
        }
    }

    #[test]
    fn seeds_are_distinct_from_the_fleet_seeds() {
        use crate::hash::*;
        let seeds = [
            SNAT_RANGE_SEED,
            SNAT_OUT_SEED,
            SNAT_IN_SEED,
            MAGLEV_OFFSET_SEED,
            MAGLEV_SKIP_SEED,
            FLOW_SEED,
            FINGERPRINT_SEED,
        ];
        for (i, a) in seeds.iter().enumerate() {
            for b in &seeds[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
