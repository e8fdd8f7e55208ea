//! [`Snapshot`]: a validated config compiled for the hot path. It holds the VIP match map, each
//! VIP's Maglev table, and its backends.
//!
//! A snapshot is built off the hot path (it allocates and builds tables), then published whole.
//! Workers read one snapshot per batch, so a packet sees one config, never a mix of two.
//!
//! **Invariants.**
//! - A snapshot is immutable once built. Each backend's [`Tunnel`] (its outer headers) is built
//!   then from `node` and the VIP's encapsulation, so neither may change afterwards.
//! - VIP indices (`u16`) are positions in [`Snapshot::vips`], in config order. Backend indices
//!   are positions in a VIP's table backend list, sorted by address (see `maglev`).
//! - The VIP maps hash with xxh3 (one-shot for the per-packet map), never `std`'s `RandomState`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::IpAddr;

use xxhash_rust::xxh3::Xxh3Builder;

use crate::hash::xxh3;

use crate::config::{Config, Encap, PortSpec, Unmatched};
use crate::encap::{EncapKind, EncapParams, Tunnel};
use crate::maglev::{MaglevTable, TableError, WeightedBackend};
use crate::snat::PortRanges;

/// One VIP as the hot path sees it.
#[derive(Clone, Debug)]
pub struct Vip {
    /// The VIP's name (for logs and metric labels).
    pub name: String,
    /// The VIP address.
    pub address: IpAddr,
    /// IP protocol number.
    pub protocol: u8,
    /// Its port, or all ports.
    pub port: PortSpec,
    /// How packets reach its backends.
    pub encap: Encap,
    /// The Maglev table; slots index [`MaglevTable::backends`].
    pub table: MaglevTable,
    /// The table's fingerprint, computed once.
    pub fingerprint: u64,
    /// [`backend_tag`] of each of the table's backends, in the same order.
    backend_tags: Vec<u32>,
    /// The tunnel to each of the table's backends, in the same order; `None` when the node has
    /// no source address of the backend's family.
    tunnels: Vec<Option<Tunnel>>,
}

impl Vip {
    /// The backend at `index` of the table's (sorted) backend list.
    #[must_use]
    pub fn backend(&self, index: u16) -> Option<&WeightedBackend> {
        self.table.backends().get(usize::from(index))
    }

    /// The tunnel to the backend at `index`, built once per snapshot from the node's source
    /// address of the backend's family, its TTL and the VIP's encapsulation; `None` when the
    /// index is out of range or the node has no such source address.
    #[inline]
    #[must_use]
    pub fn tunnel(&self, index: u16) -> Option<&Tunnel> {
        self.tunnels.get(usize::from(index))?.as_ref()
    }

    /// The [`backend_tag`] of the backend at `index`, computed once per snapshot.
    #[inline]
    #[must_use]
    pub fn backend_tag(&self, index: u16) -> Option<u32> {
        self.backend_tags.get(usize::from(index)).copied()
    }

    /// Whether a tracked flow may keep using `index`: the backend at that index is still the one
    /// tracked (same tag), so it is still in the table. A drained backend (weight 0) keeps its
    /// tracked flows; one removed from the config does not.
    #[inline]
    #[must_use]
    pub fn still_serves(&self, index: u16, tag: u32) -> bool {
        self.backend_tag(index) == Some(tag)
    }
}

/// A 32-bit tag of a backend's address. A tracked flow keeps its backend only while the
/// snapshot's backend at the tracked index has the same tag: a reload may renumber backends.
#[must_use]
pub fn backend_tag(address: IpAddr) -> u32 {
    let bytes = match address {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    (xxh3(&bytes, 0x6c62_2d74_6167_0000) >> 32) as u32
}

/// The tunnel from the node to `backend`: from the node's address of its family, with the
/// node's TTL; `None` when the node has no address of that family.
fn tunnel(node: &NodeSettings, encap: Encap, backend: IpAddr) -> Option<Tunnel> {
    let outer_src = source_of(node, backend)?;
    let kind = match encap {
        Encap::Ipip => EncapKind::Ipip,
        Encap::Gre => EncapKind::Gre { key: None },
    };
    // The node's addresses are of their family (config validation), so this cannot fail.
    Tunnel::new(EncapParams {
        outer_src,
        outer_dst: backend,
        ttl: node.ttl,
        kind,
    })
    .ok()
}

/// The node's address of `backend`'s family: the outer source towards it.
fn source_of(node: &NodeSettings, backend: IpAddr) -> Option<IpAddr> {
    match backend {
        IpAddr::V4(_) => node.address_v4,
        IpAddr::V6(_) => node.address_v6,
    }
}

/// The node's settings the hot path uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    /// Outer source for IPv4 backends.
    pub address_v4: Option<IpAddr>,
    /// Outer source for IPv6 backends.
    pub address_v6: Option<IpAddr>,
    /// MTU towards the backends.
    pub mtu: u16,
    /// Outer TTL / hop limit.
    pub ttl: u8,
    /// Packets matching no VIP.
    pub unmatched: Unmatched,
}

/// The key of an exact VIP match; `port` 0 stands for "all ports".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct VipKey {
    address: IpAddr,
    protocol: u8,
    port: u16,
}

/// One buffer, one hash: the derived `Hash` would feed the enum field by field (measured: 210
/// instructions a lookup; this way about 40).
impl Hash for VipKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut bytes = [0u8; 19];
        bytes[..16].copy_from_slice(&match self.address {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => a.octets(),
        });
        bytes[16] = self.protocol;
        bytes[17..].copy_from_slice(&self.port.to_be_bytes());
        state.write(&bytes);
    }
}

/// A hasher for keys that write themselves in one piece: one-shot xxh3 (fixed seed) per write.
#[derive(Clone, Copy, Debug, Default)]
struct OneShot(u64);

impl Hasher for OneShot {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxh3(bytes, self.0 ^ 0x6c62_7669_706d_6170);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type OneShotBuild = BuildHasherDefault<OneShot>;

/// Up to this many VIP keys, [`Snapshot::match_vip`] scans a packed array instead of hashing.
const LINEAR_VIPS: usize = 16;

/// A VIP key as two integers: the address (IPv4 as IPv4-mapped IPv6), and the family (bit 24,
/// so that an IPv6 packet to `::ffff:a.b.c.d` never matches an IPv4 VIP), protocol and port.
type PackedVipKey = (u128, u32);

fn pack(address: IpAddr, protocol: u8, port: u16) -> PackedVipKey {
    let (address, family) = match address {
        IpAddr::V4(a) => (a.to_ipv6_mapped(), 0),
        IpAddr::V6(a) => (a, 1 << 24),
    };
    (
        u128::from(address),
        family | u32::from(protocol) << 16 | u32::from(port),
    )
}

/// An IPv4 VIP key as one integer: address, protocol, port (0 for all ports).
fn pack_v4(address: u32, protocol: u8, port: u16) -> u64 {
    u64::from(address) << 32 | u64::from(protocol) << 16 | u64::from(port)
}

/// A config compiled for the hot path.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Incremented by each successful reload.
    pub generation: u64,
    /// The node's settings.
    pub node: NodeSettings,
    /// The VIPs, in config order.
    pub vips: Vec<Vip>,
    by_key: HashMap<VipKey, u16, OneShotBuild>,
    /// The same keys packed for a linear scan, when there are at most [`LINEAR_VIPS`]: cheaper
    /// than hashing for a few VIPs. Empty when there are more.
    linear: Vec<(PackedVipKey, u16)>,
    /// The IPv4 keys of `linear` as one integer each ([`pack_v4`]), in the same order: the
    /// common case, matched without building an IPv6-mapped address.
    linear_v4: Vec<(u64, u16)>,
    /// For fragments, which carry no port: the VIP of an (address, protocol), if one is clear.
    by_address: HashMap<(IpAddr, u8), u16, Xxh3Builder>,
    /// Daisy chaining (Beamer): the previous generation's tables, until a deadline.
    previous: Option<Previous>,
    /// Egress SNAT return traffic: per SNAT address, who owns which port range.
    snat: Vec<SnatReturn>,
}

/// The SNAT port ranges of one VIP address, as the mux sees them: one owner per range, and a
/// tunnel to each owner (the encapsulation of the address's first VIP).
#[derive(Clone, Debug)]
struct SnatReturn {
    ranges: PortRanges,
    tunnels: Vec<Option<Tunnel>>,
}

/// The SNAT return map of every `[[snat]]` section: the range split over the backends of the
/// VIPs on its address, and a tunnel to each (GRE if a VIP on the address uses GRE, else
/// IP-in-IP).
fn snat_returns(config: &Config, node: &NodeSettings) -> Vec<SnatReturn> {
    config
        .snats
        .iter()
        .map(|c| {
            let ranges = PortRanges::build(c, &config.snat_backends(c.address));
            // GRE if any VIP on the address uses it (GRE carries either family), else IP-in-IP:
            // a choice that does not depend on the order of the VIPs in the file.
            let encap = if config
                .vips
                .iter()
                .any(|v| v.address == c.address && v.encap == Encap::Gre)
            {
                Encap::Gre
            } else {
                Encap::Ipip
            };
            let tunnels = ranges
                .backends()
                .iter()
                .map(|&b| tunnel(node, encap, b))
                .collect();
            SnatReturn { ranges, tunnels }
        })
        .collect()
}

/// The tables a snapshot replaced, kept for a window so that a mux can name a flow's previous
/// backend (see [`Snapshot::chain_from`]).
#[derive(Clone, Debug)]
struct Previous {
    /// Per current VIP (by index): the table it had before its last change, and `now` (the
    /// workers' clock, nanoseconds) after which it is ignored. Only GRE VIPs, whose key can
    /// carry the previous backend.
    tables: Vec<Option<(MaglevTable, u64)>>,
}

impl Snapshot {
    /// Compiles a validated config: builds every table. Not for the hot path.
    pub fn compile(config: &Config, generation: u64) -> Result<Self, TableError> {
        let node = NodeSettings {
            address_v4: config.node.address_v4,
            address_v6: config.node.address_v6,
            mtu: config.node.mtu,
            ttl: config.node.ttl,
            unmatched: config.node.unmatched,
        };
        let mut vips = Vec::with_capacity(config.vips.len());
        let mut by_key = HashMap::with_hasher(OneShotBuild::default());
        for (i, v) in config.vips.iter().enumerate() {
            let table = v.table()?;
            let port = match v.port {
                PortSpec::Port(p) => p,
                PortSpec::All => 0,
            };
            let protocol = v.protocol.number();
            // Validation rejects overlapping VIPs, and the config bounds their count.
            by_key.insert(
                VipKey {
                    address: v.address,
                    protocol,
                    port,
                },
                u16::try_from(i).unwrap_or(u16::MAX),
            );
            vips.push(Vip {
                name: v.name.clone(),
                address: v.address,
                protocol,
                port: v.port,
                encap: v.encap,
                fingerprint: table.fingerprint(),
                backend_tags: table
                    .backends()
                    .iter()
                    .map(|b| backend_tag(b.id.0))
                    .collect(),
                tunnels: table
                    .backends()
                    .iter()
                    .map(|b| tunnel(&node, v.encap, b.id.0))
                    .collect(),
                table,
            });
        }
        // Fragments: the all-ports VIP of an address and protocol if there is one; else the VIP
        // if it is the only one there; several port VIPs make a fragment's VIP ambiguous.
        let mut by_address = HashMap::with_hasher(Xxh3Builder::new());
        for (i, v) in vips.iter().enumerate() {
            let on_same: Vec<&Vip> = vips
                .iter()
                .filter(|o| o.address == v.address && o.protocol == v.protocol)
                .collect();
            if v.port == PortSpec::All || on_same.len() == 1 {
                by_address.insert(
                    (v.address, v.protocol),
                    u16::try_from(i).unwrap_or(u16::MAX),
                );
            }
        }
        let snat = snat_returns(config, &node);
        let linear = if by_key.len() <= LINEAR_VIPS {
            let mut keys: Vec<_> = by_key
                .iter()
                .map(|(k, &i)| (pack(k.address, k.protocol, k.port), i))
                .collect();
            keys.sort_unstable();
            keys
        } else {
            Vec::new()
        };
        let linear_v4 = linear
            .iter()
            .filter(|((_, k), _)| k >> 24 == 0)
            .map(|&((a, k), i)| {
                // An IPv4 key holds an IPv4-mapped address: its low 32 bits are the address.
                let [_, protocol, _, _] = k.to_be_bytes();
                (pack_v4(a as u32, protocol, k as u16), i)
            })
            .collect();
        Ok(Self {
            generation,
            node,
            vips,
            by_key,
            linear,
            linear_v4,
            by_address,
            previous: None,
            snat,
        })
    }

    /// Takes the SNAT port-range split from `config` instead of the compiled one. The split must
    /// follow the config file, as every agent's does, not health or drain overrides: an
    /// unhealthy backend keeps its ranges (its agent still owns those ports). Call before
    /// publishing.
    pub fn use_snat_of(&mut self, config: &Config) {
        self.snat = snat_returns(config, &self.node);
    }

    /// The backend that owns SNAT port `port` of `address` (return traffic of an egress
    /// connection), with its tunnel; None when the address has no SNAT or the port is outside
    /// its space.
    #[inline]
    #[must_use]
    pub fn snat_owner(&self, address: IpAddr, port: u16) -> Option<(IpAddr, &Tunnel)> {
        let snat = self.snat.iter().find(|s| s.ranges.address() == address)?;
        let index = snat.ranges.owner_index(port)?;
        let to = *snat.ranges.backends().get(usize::from(index))?;
        let tunnel = snat.tunnels.get(usize::from(index))?.as_ref()?;
        Some((to, tunnel))
    }

    /// Keeps `old`'s tables as the previous generation until `until` (the workers' clock, in
    /// nanoseconds): for that window, a GRE VIP's packet steered by the table to a backend other
    /// than the one `old` would have chosen carries the old one's [`backend_tag`] in its GRE
    /// key, so the new backend's agent can chain a connection it does not have on to it.
    ///
    /// A VIP whose table did not change keeps the previous table `old` kept for it, with its
    /// own deadline: a reload of something else does not cut an open window short. Call before
    /// publishing; a snapshot is immutable once published.
    ///
    /// Returns false when a previous table could not be kept for lack of memory (that VIP then
    /// does not chain in this window); the copy never aborts the process.
    pub fn chain_from(&mut self, old: &Snapshot, until: u64) -> bool {
        let mut complete = true;
        let tables = self
            .vips
            .iter()
            .map(|v| {
                if v.encap != Encap::Gre {
                    return None;
                }
                let (index, o) = old
                    .vips
                    .iter()
                    .enumerate()
                    .find(|(_, o)| o.name == v.name)?;
                let kept = if o.fingerprint == v.fingerprint {
                    let (table, until) = old.previous.as_ref()?.tables.get(index)?.as_ref()?;
                    (table, *until)
                } else {
                    (&o.table, until)
                };
                match kept.0.try_clone() {
                    Ok(table) => Some((table, kept.1)),
                    Err(_) => {
                        complete = false;
                        None
                    }
                }
            })
            .collect::<Vec<_>>();
        self.previous = tables
            .iter()
            .any(Option::is_some)
            .then_some(Previous { tables });
        complete
    }

    /// The tag of the backend the previous generation's table gives `flow_hash` of VIP
    /// `vip_index`, while the chaining window is open and if it differs from `backend`.
    #[inline]
    #[must_use]
    pub fn previous_backend_tag(
        &self,
        vip_index: u16,
        flow_hash: u64,
        backend: IpAddr,
        now: u64,
    ) -> Option<u32> {
        let (table, until) = self
            .previous
            .as_ref()?
            .tables
            .get(usize::from(vip_index))?
            .as_ref()?;
        if now >= *until {
            return None;
        }
        let old = table.lookup_backend(flow_hash)?.id.0;
        (old != backend).then(|| backend_tag(old))
    }

    /// The VIP a packet to `dst`, `protocol`, `dst_port` belongs to: an exact port match first,
    /// then an all-ports VIP of the address and protocol.
    #[inline]
    #[must_use]
    pub fn match_vip(&self, dst: IpAddr, protocol: u8, dst_port: u16) -> Option<u16> {
        match dst {
            IpAddr::V4(a) if !self.linear.is_empty() => {
                self.match_linear_v4(u32::from(a), protocol, dst_port)
            }
            _ => self.match_vip_general(dst, protocol, dst_port),
        }
    }

    /// [`Self::match_vip`] for IPv4 with few VIPs: one pass over `linear_v4`, an exact key
    /// first, else the all-ports key (they are distinct, so the first exact one wins).
    #[inline]
    fn match_linear_v4(&self, address: u32, protocol: u8, dst_port: u16) -> Option<u16> {
        let any_port = pack_v4(address, protocol, 0);
        let exact = any_port | u64::from(dst_port);
        let mut all_ports = None;
        for &(key, index) in &self.linear_v4 {
            if key == exact {
                return Some(index);
            }
            if key == any_port {
                all_ports = Some(index);
            }
        }
        all_ports
    }

    /// [`Self::match_vip`] for IPv6, or for more than [`LINEAR_VIPS`] keys.
    #[inline(never)]
    fn match_vip_general(&self, dst: IpAddr, protocol: u8, dst_port: u16) -> Option<u16> {
        if !self.linear.is_empty() {
            let (address, exact) = pack(dst, protocol, dst_port);
            let any_port = exact & !0xffff;
            let find = |want: u32| {
                self.linear
                    .iter()
                    .find(|((a, k), _)| *a == address && *k == want)
                    .map(|&(_, i)| i)
            };
            return if dst_port != 0 {
                find(exact).or_else(|| find(any_port))
            } else {
                find(any_port)
            };
        }
        let key = VipKey {
            address: dst,
            protocol,
            port: dst_port,
        };
        if dst_port != 0
            && let Some(&i) = self.by_key.get(&key)
        {
            return Some(i);
        }
        self.by_key.get(&VipKey { port: 0, ..key }).copied()
    }

    /// The VIP of a fragment, which has no port (see `by_address`).
    #[inline]
    #[must_use]
    pub fn match_vip_of_fragment(&self, dst: IpAddr, protocol: u8) -> Option<u16> {
        self.by_address.get(&(dst, protocol)).copied()
    }

    /// The VIP at `index`.
    #[must_use]
    pub fn vip(&self, index: u16) -> Option<&Vip> {
        self.vips.get(usize::from(index))
    }

    /// The outer source address for a backend of this family, if the node has one.
    #[must_use]
    pub fn source_for(&self, backend: IpAddr) -> Option<IpAddr> {
        source_of(&self.node, backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{PROTO_TCP, PROTO_UDP};

    fn snapshot() -> Snapshot {
        let text = r#"
            [node]
            address_v4 = "198.18.11.2"
            [[vip]]
            name = "web"
            address = "198.18.100.1"
            protocol = "tcp"
            port = 80
            encap = "ipip"
            [[vip.backend]]
            address = "198.18.21.2"
            [[vip]]
            name = "all-udp"
            address = "198.18.100.1"
            protocol = "udp"
            port = "all"
            encap = "gre"
            [[vip.backend]]
            address = "198.18.22.2"
        "#;
        Snapshot::compile(&Config::from_toml(text, "t").unwrap(), 7).unwrap()
    }

    #[test]
    fn vip_match_by_address_protocol_and_port() {
        let s = snapshot();
        let vip: IpAddr = "198.18.100.1".parse().unwrap();
        assert_eq!(s.match_vip(vip, PROTO_TCP, 80), Some(0));
        assert_eq!(s.match_vip(vip, PROTO_TCP, 81), None);
        assert_eq!(s.match_vip(vip, PROTO_UDP, 53), Some(1), "all-ports VIP");
        assert_eq!(
            s.match_vip(vip, PROTO_UDP, 0),
            Some(1),
            "port-less packets (fragments) match all-ports VIPs"
        );
        assert_eq!(
            s.match_vip("198.18.100.2".parse().unwrap(), PROTO_TCP, 80),
            None
        );
        assert_eq!(
            s.match_vip_of_fragment(vip, PROTO_TCP),
            Some(0),
            "the only TCP VIP there"
        );
        assert_eq!(s.match_vip_of_fragment(vip, PROTO_UDP), Some(1));
        assert_eq!(s.generation, 7);
        assert_eq!(s.vips[0].fingerprint, s.vips[0].table.fingerprint());
    }

    #[test]
    fn fragments_of_an_address_with_several_port_vips_are_ambiguous() {
        let text = r#"
            [node]
            address_v4 = "198.18.11.2"
            [[vip]]
            name = "http"
            address = "198.18.100.1"
            protocol = "tcp"
            port = 80
            encap = "ipip"
            [[vip]]
            name = "https"
            address = "198.18.100.1"
            protocol = "tcp"
            port = 443
            encap = "ipip"
        "#;
        let s = Snapshot::compile(&Config::from_toml(text, "t").unwrap(), 1).unwrap();
        assert_eq!(
            s.match_vip_of_fragment("198.18.100.1".parse().unwrap(), PROTO_TCP),
            None
        );
    }

    #[test]
    fn linear_scan_and_hash_map_agree() {
        let mut s = snapshot();
        assert!(!s.linear.is_empty(), "two VIPs use the linear scan");
        let addresses: [IpAddr; 3] = [
            "198.18.100.1".parse().unwrap(),
            "198.18.100.2".parse().unwrap(),
            "::ffff:198.18.100.1".parse().unwrap(),
        ];
        let mut probes = Vec::new();
        for a in addresses {
            for p in [PROTO_TCP, PROTO_UDP, 1] {
                for port in [0u16, 53, 80, 81] {
                    probes.push((a, p, port));
                }
            }
        }
        let linear: Vec<_> = probes
            .iter()
            .map(|&(a, p, port)| s.match_vip(a, p, port))
            .collect();
        s.linear.clear();
        let hashed: Vec<_> = probes
            .iter()
            .map(|&(a, p, port)| s.match_vip(a, p, port))
            .collect();
        assert_eq!(linear, hashed);
        assert!(linear.iter().filter(|m| m.is_some()).count() >= 4);
    }

    #[test]
    fn ipv4_scan_and_hash_map_agree_with_both_families() {
        let text = r#"
            [node]
            address_v4 = "198.18.11.2"
            address_v6 = "2001:db8:11::2"
            [[vip]]
            name = "web"
            address = "198.18.100.1"
            protocol = "tcp"
            port = 80
            encap = "ipip"
            [[vip]]
            name = "web-tls"
            address = "198.18.100.1"
            protocol = "tcp"
            port = 443
            encap = "ipip"
            [[vip]]
            name = "dns"
            address = "198.18.100.2"
            protocol = "udp"
            port = "all"
            encap = "gre"
            [[vip]]
            name = "web6"
            address = "2001:db8:100::1"
            protocol = "tcp"
            port = 80
            encap = "ipip"
        "#;
        let mut s = Snapshot::compile(&Config::from_toml(text, "t").unwrap(), 1).unwrap();
        assert_eq!(s.linear_v4.len(), 3);
        let addresses: [IpAddr; 6] = [
            "198.18.100.1".parse().unwrap(),
            "198.18.100.2".parse().unwrap(),
            "198.18.100.3".parse().unwrap(),
            "2001:db8:100::1".parse().unwrap(),
            "::ffff:198.18.100.1".parse().unwrap(),
            "::ffff:198.18.100.3".parse().unwrap(),
        ];
        let mut probes = Vec::new();
        for a in addresses {
            for p in [PROTO_TCP, PROTO_UDP, 1] {
                for port in [0u16, 53, 80, 443, 444] {
                    probes.push((a, p, port));
                }
            }
        }
        let scanned: Vec<_> = probes
            .iter()
            .map(|&(a, p, port)| s.match_vip(a, p, port))
            .collect();
        s.linear.clear();
        let hashed: Vec<_> = probes
            .iter()
            .map(|&(a, p, port)| s.match_vip(a, p, port))
            .collect();
        assert_eq!(scanned, hashed);
        // 198.18.100.1: tcp 80, 443; 198.18.100.2: udp at every port; 2001:db8:100::1: tcp 80.
        assert_eq!(scanned.iter().filter(|m| m.is_some()).count(), 2 + 5 + 1);
    }

    #[test]
    fn tracked_backend_must_still_be_in_the_table() {
        let s = snapshot();
        let be = backend_tag("198.18.21.2".parse().unwrap());
        assert!(s.vips[0].still_serves(0, be));
        assert!(!s.vips[0].still_serves(0, backend_tag("198.18.29.9".parse().unwrap())));
        assert!(!s.vips[0].still_serves(5, be));
    }
}
