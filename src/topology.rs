//! The test fleet: a client, an ECMP router, muxes and backends, each in its own namespace of
//! a [`Lab`], wired and addressed like the lab's `lbtopo.sh`.
//!
//! ```text
//!  client c0 198.18.1.2 ── r-c 198.18.1.1 [router] r-mI 198.18.1I.1 ── m0 198.18.1I.2 muxI  (I = 1..=9)
//!                                         [router] r-bJ 198.18.2J.1 ── b0 198.18.2J.2 beJ   (J = 1..=9)
//! ```
//!
//! Invariant: only addresses of 198.18.0.0/15 (the benchmarking range) are used, and only
//! inside the lab's namespaces; nothing is added to the root namespace. The VIP
//! ([`Fleet::VIP`]) is routed by the router over the muxes ([`Fleet::route_vip_via`]); the
//! muxes have `ip_forward` 0 and no VIP, so their kernel drops VIP packets silently and only a
//! userspace mux sees them. Backends get the VIP on `lo` (for direct server return) only when
//! asked ([`Fleet::add_backend_vips`]).
//!
//! The addressing plan puts mux `i` in 198.18.(10+i).0/24 and backend `j` in
//! 198.18.(20+j).0/24, hence at most [`Fleet::MAX_MUXES`] muxes and [`Fleet::MAX_BACKENDS`]
//! backends.
//!
//! **Dual stack** ([`FleetPlan::ipv6`]). Every link also gets IPv6 addresses from the
//! benchmarking range 2001:2::/48 (RFC 5180), mirroring the IPv4 plan: the IPv4 link
//! 198.18.N.0/24 becomes 2001:2:0:N::/64 (N written with the same digits, so mux `i` is on
//! 2001:2:0:1`i`::/64 and backend `j` on 2001:2:0:2`j`::/64), the router is `::1` and the
//! host `::2` on each link, and the VIP is [`Fleet::VIP6`] = 2001:2:0:100::1.
//!
//! ```text
//!  client c0 2001:2:0:1::2 ── r-c 2001:2:0:1::1 [router] r-mI 2001:2:0:1I::1 ── m0 2001:2:0:1I::2
//!                                               [router] r-bJ 2001:2:0:2J::1 ── b0 2001:2:0:2J::2
//! ```
//!
//! In every namespace duplicate address detection is off (`accept_dad` 0, and `nodad` on each
//! address), so addresses are usable at once. The router forwards IPv6 and hashes it on the
//! 5-tuple (`net.ipv6.fib_multipath_hash_policy` 1; the kernel hashes IPv6 with the seed of
//! `net.ipv4.fib_multipath_hash_seed` too); the muxes keep `net.ipv6.conf.all.forwarding` 0, so
//! their kernel drops VIP6 packets as it drops IPv4 VIP packets. Only addresses of 2001:2::/48
//! are used, only inside the lab's namespaces.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_core::config::IoMode;

use crate::netns::{Lab, Namespace, VethEnd};

/// The environment variable that chooses the `node.io` of the lab's muxes and agents (and the
/// namespace tests'): `auto` (the default: AF_XDP on the lab's veths), `af_xdp` or `af_packet`.
pub const LAB_IO_VARIABLE: &str = "LB_LAB_IO";

/// The `node.io` the lab's muxes and agents run with ([`LAB_IO_VARIABLE`]); an error names a
/// bad value.
pub fn lab_io() -> Result<IoMode, String> {
    match std::env::var(LAB_IO_VARIABLE) {
        Err(_) => Ok(IoMode::Auto),
        Ok(v) => [IoMode::Auto, IoMode::AfXdp, IoMode::AfPacket]
            .into_iter()
            .find(|m| m.as_str() == v)
            .ok_or_else(|| format!("{LAB_IO_VARIABLE}={v:?}: expected auto, af_xdp or af_packet")),
    }
}

/// `config` (a mux's or an agent's) with `io` set to [`lab_io`] in its `[node]` section,
/// unless it sets `io` itself.
pub fn with_lab_io(config: &str) -> Result<String, String> {
    let io = lab_io()?;
    if config.lines().any(|l| l.trim_start().starts_with("io ")) {
        return Ok(config.to_owned());
    }
    Ok(config.replacen(
        "[node]\n",
        &format!("[node]\nio = \"{}\"\n", io.as_str()),
        1,
    ))
}

/// What [`Fleet::build`] builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FleetPlan {
    /// Number of muxes, 1 to [`Fleet::MAX_MUXES`].
    pub muxes: usize,
    /// Number of backends, 1 to [`Fleet::MAX_BACKENDS`].
    pub backends: usize,
    /// The router's VIP route uses a resilient nexthop group (only a lost mux's flows move)
    /// instead of a plain multipath route (up to half of the flows may move).
    pub resilient: bool,
    /// Dual stack: IPv6 addresses on every link as well, IPv6 forwarding and ECMP on the
    /// router, and a route for [`Fleet::VIP6`] over the muxes (see the module docs).
    pub ipv6: bool,
}

/// A built fleet: handles to its namespaces (which live as long as the [`Lab`]).
#[derive(Debug)]
pub struct Fleet {
    /// The client; interface `c0`, [`Fleet::CLIENT`], default route via the router.
    pub client: Namespace,
    /// The router: forwards, hashes ECMP on the 5-tuple.
    pub router: Namespace,
    /// Muxes 1..=n at indices 0..n; interface `m0`, [`Fleet::mux_address`].
    pub muxes: Vec<Namespace>,
    /// Backends 1..=n at indices 0..n; interface `b0`, [`Fleet::backend_address`].
    pub backends: Vec<Namespace>,
    plan: FleetPlan,
}

impl Fleet {
    /// The virtual IP the fleet serves.
    pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
    /// The IPv6 virtual IP the fleet serves (with [`FleetPlan::ipv6`]).
    pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0x100, 0, 0, 0, 1);
    /// The client's IPv6 address (with [`FleetPlan::ipv6`]).
    pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 2);
    /// The router's IPv6 address on the client's link, the client's IPv6 gateway.
    pub const ROUTER_CLIENT_SIDE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 1);
    /// Id of the resilient nexthop group of the IPv4 VIP route; its nexthops are ids 1..=9
    /// (the mux index).
    pub const NEXTHOP_GROUP: u32 = 100;
    /// Id of the resilient nexthop group of the IPv6 VIP route.
    pub const NEXTHOP_GROUP6: u32 = 600;
    /// The IPv6 nexthop of mux `i` has id `NEXTHOP6_BASE + i` (61..=69): no collision with
    /// the IPv4 ones (1..=9) nor with the groups.
    pub const NEXTHOP6_BASE: u32 = 60;
    /// The client's address (interface `c0`).
    pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
    /// The router's address on the client's link (interface `r-c`), the client's gateway.
    pub const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
    /// Most muxes the addressing plan allows.
    pub const MAX_MUXES: usize = 9;
    /// Most backends the addressing plan allows.
    pub const MAX_BACKENDS: usize = 9;
    /// `fib_multipath_hash_seed` of the router: flow → mux mapping is reproducible.
    pub const HASH_SEED: u32 = 12345;
    /// The "internet" host of [`Fleet::add_internet`] (egress SNAT's destination).
    pub const INTERNET: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
    /// The router's address on the internet host's link, the internet host's gateway.
    pub const INTERNET_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
    /// MTU of the client link (1500, like a real client).
    pub const CLIENT_MTU: u32 = 1500;
    /// MTU of the mux and backend links: room for an encapsulation header on a full packet.
    pub const INNER_MTU: u32 = 1600;

    /// Address of mux `i` (1-based) on its link: 198.18.1`i`.2. Panics if `i` is not 1..=9.
    pub fn mux_address(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, subnet(10, i, Self::MAX_MUXES, "mux"), 2)
    }

    /// The router's address on mux `i`'s link (interface `r-m{i}`): 198.18.1`i`.1.
    pub fn router_mux_side(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, subnet(10, i, Self::MAX_MUXES, "mux"), 1)
    }

    /// Address of backend `j` (1-based) on its link: 198.18.2`j`.2. Panics if `j` is not 1..=9.
    pub fn backend_address(j: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, subnet(20, j, Self::MAX_BACKENDS, "backend"), 2)
    }

    /// The router's address on backend `j`'s link (interface `r-b{j}`): 198.18.2`j`.1.
    pub fn router_backend_side(j: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, subnet(20, j, Self::MAX_BACKENDS, "backend"), 1)
    }

    /// IPv6 address of mux `i` (1-based): 2001:2:0:1`i`::2. Panics if `i` is not 1..=9.
    pub fn mux_address_v6(i: usize) -> Ipv6Addr {
        v6(subnet(10, i, Self::MAX_MUXES, "mux"), 2)
    }

    /// The router's IPv6 address on mux `i`'s link: 2001:2:0:1`i`::1.
    pub fn router_mux_side_v6(i: usize) -> Ipv6Addr {
        v6(subnet(10, i, Self::MAX_MUXES, "mux"), 1)
    }

    /// IPv6 address of backend `j` (1-based): 2001:2:0:2`j`::2. Panics if `j` is not 1..=9.
    pub fn backend_address_v6(j: usize) -> Ipv6Addr {
        v6(subnet(20, j, Self::MAX_BACKENDS, "backend"), 2)
    }

    /// The router's IPv6 address on backend `j`'s link: 2001:2:0:2`j`::1.
    pub fn router_backend_side_v6(j: usize) -> Ipv6Addr {
        v6(subnet(20, j, Self::MAX_BACKENDS, "backend"), 1)
    }

    /// Creates the namespaces in `lab` and wires them. One fleet per lab (namespace names
    /// would collide). The VIP route goes via all muxes; backends have no VIP yet.
    ///
    /// Needs `ip` and `ethtool` (the client's checksum offload is turned off, so packets a
    /// userspace component copies carry real checksums).
    pub fn build(lab: &mut Lab, plan: &FleetPlan) -> io::Result<Fleet> {
        if !(1..=Self::MAX_MUXES).contains(&plan.muxes)
            || !(1..=Self::MAX_BACKENDS).contains(&plan.backends)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "fleet of {} muxes and {} backends: each must be 1 to 9",
                    plan.muxes, plan.backends
                ),
            ));
        }
        let client = lab.namespace("client")?;
        let router = lab.namespace("router")?;
        let muxes = (1..=plan.muxes)
            .map(|i| lab.namespace(&format!("mux{i}")))
            .collect::<io::Result<Vec<_>>>()?;
        let backends = (1..=plan.backends)
            .map(|j| lab.namespace(&format!("be{j}")))
            .collect::<io::Result<Vec<_>>>()?;

        // Router settings first: `default` values apply to the links created below.
        let seed = Self::HASH_SEED.to_string();
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv4.fib_multipath_hash_seed", seed.as_str()),
            ("net.ipv4.conf.all.ignore_routes_with_linkdown", "1"),
            ("net.ipv4.conf.default.ignore_routes_with_linkdown", "1"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
        ] {
            router.sysctl(key, value)?;
        }
        if plan.ipv6 {
            // Before any link exists: `default` is what new devices inherit.
            for ns in [&client, &router]
                .into_iter()
                .chain(&muxes)
                .chain(&backends)
            {
                for (key, value) in [
                    ("net.ipv6.conf.all.disable_ipv6", "0"),
                    ("net.ipv6.conf.default.disable_ipv6", "0"),
                    ("net.ipv6.conf.all.accept_dad", "0"),
                    ("net.ipv6.conf.default.accept_dad", "0"),
                    ("net.ipv6.conf.all.forwarding", "0"),
                ] {
                    ns.sysctl(key, value)?;
                }
            }
            for (key, value) in [
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv6.fib_multipath_hash_policy", "1"),
                ("net.ipv6.conf.all.ignore_routes_with_linkdown", "1"),
                ("net.ipv6.conf.default.ignore_routes_with_linkdown", "1"),
            ] {
                router.sysctl(key, value)?;
            }
        }
        // Adds the IPv6 addresses of a link and the host's default IPv6 route.
        let dual = |host: &Namespace,
                    host_if: &str,
                    host_addr: Ipv6Addr,
                    router_if: &str,
                    router_addr: Ipv6Addr|
         -> io::Result<()> {
            if !plan.ipv6 {
                return Ok(());
            }
            add_v6(host, host_if, host_addr)?;
            add_v6(&router, router_if, router_addr)?;
            let gw = router_addr.to_string();
            host.ip(&["-6", "route", "add", "default", "via", &gw, "dev", host_if])?;
            Ok(())
        };

        lab.veth(
            VethEnd::new(&client, "c0", &cidr24(Self::CLIENT)),
            VethEnd::new(&router, "r-c", &cidr24(Self::ROUTER_CLIENT_SIDE)),
            Self::CLIENT_MTU,
        )?;
        client.exec_checked("ethtool", &["-K", "c0", "tx", "off"])?;
        let gw = Self::ROUTER_CLIENT_SIDE.to_string();
        client.ip(&["route", "add", "default", "via", &gw])?;
        dual(
            &client,
            "c0",
            Self::CLIENT6,
            "r-c",
            Self::ROUTER_CLIENT_SIDE6,
        )?;

        for (k, mux) in muxes.iter().enumerate() {
            let i = k + 1;
            lab.veth(
                VethEnd::new(mux, "m0", &cidr24(Self::mux_address(i))),
                VethEnd::new(
                    &router,
                    &format!("r-m{i}"),
                    &cidr24(Self::router_mux_side(i)),
                ),
                Self::INNER_MTU,
            )?;
            let gw = Self::router_mux_side(i).to_string();
            mux.ip(&["route", "add", "default", "via", &gw])?;
            dual(
                mux,
                "m0",
                Self::mux_address_v6(i),
                &format!("r-m{i}"),
                Self::router_mux_side_v6(i),
            )?;
        }
        for (k, be) in backends.iter().enumerate() {
            let j = k + 1;
            lab.veth(
                VethEnd::new(be, "b0", &cidr24(Self::backend_address(j))),
                VethEnd::new(
                    &router,
                    &format!("r-b{j}"),
                    &cidr24(Self::router_backend_side(j)),
                ),
                Self::INNER_MTU,
            )?;
            let gw = Self::router_backend_side(j).to_string();
            be.ip(&["route", "add", "default", "via", &gw])?;
            dual(
                be,
                "b0",
                Self::backend_address_v6(j),
                &format!("r-b{j}"),
                Self::router_backend_side_v6(j),
            )?;
            // Once the VIP is on lo: never answer ARP for it, never source ARP from it.
            be.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            be.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
        }

        let fleet = Fleet {
            client,
            router,
            muxes,
            backends,
            plan: *plan,
        };
        let all: Vec<usize> = (1..=plan.muxes).collect();
        fleet.route_vip_via(&all)?;
        Ok(fleet)
    }

    /// Handles to a fleet that `plan` built earlier in `lab` (a re-attached persistent lab);
    /// fails if one of its namespaces is missing.
    pub fn attach(lab: &Lab, plan: &FleetPlan) -> io::Result<Fleet> {
        let get = |short: String| {
            lab.existing_namespace(&short).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("namespace {}-{short} is gone", lab.prefix()),
                )
            })
        };
        Ok(Fleet {
            client: get("client".into())?,
            router: get("router".into())?,
            muxes: (1..=plan.muxes)
                .map(|i| get(format!("mux{i}")))
                .collect::<io::Result<_>>()?,
            backends: (1..=plan.backends)
                .map(|j| get(format!("be{j}")))
                .collect::<io::Result<_>>()?,
            plan: *plan,
        })
    }

    /// The plan this fleet was built from.
    pub fn plan(&self) -> &FleetPlan {
        &self.plan
    }

    /// Mux `i` (1-based). Panics if there is no such mux.
    pub fn mux(&self, i: usize) -> &Namespace {
        &self.muxes[i.checked_sub(1).expect("muxes are numbered from 1")]
    }

    /// Backend `j` (1-based). Panics if there is no such backend.
    pub fn backend(&self, j: usize) -> &Namespace {
        &self.backends[j.checked_sub(1).expect("backends are numbered from 1")]
    }

    /// Sets the router's route for [`VIP`](Self::VIP)/32 to ECMP over the given muxes
    /// (1-based indices): a plain multipath route, or with [`FleetPlan::resilient`] a resilient
    /// nexthop group (id [`NEXTHOP_GROUP`](Self::NEXTHOP_GROUP), 64 buckets, nexthop ids = mux
    /// indices). With [`FleetPlan::ipv6`] the same for [`VIP6`](Self::VIP6)/128 over the muxes'
    /// IPv6 addresses (group [`NEXTHOP_GROUP6`](Self::NEXTHOP_GROUP6), nexthop ids
    /// [`NEXTHOP6_BASE`](Self::NEXTHOP6_BASE) + index). An empty list removes the route(s).
    pub fn route_vip_via(&self, muxes: &[usize]) -> io::Result<()> {
        if let Some(&bad) = muxes.iter().find(|&&i| i == 0 || i > self.plan.muxes) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no mux {bad} (fleet has {})", self.plan.muxes),
            ));
        }
        self.route_family(muxes, false)?;
        if self.plan.ipv6 {
            self.route_family(muxes, true)?;
        }
        Ok(())
    }

    /// [`route_vip_via`](Self::route_vip_via) for one address family.
    fn route_family(&self, muxes: &[usize], ipv6: bool) -> io::Result<()> {
        let family = if ipv6 { "-6" } else { "-4" };
        let (vip, group_id, base) = if ipv6 {
            (
                format!("{}/128", Self::VIP6),
                Self::NEXTHOP_GROUP6,
                Self::NEXTHOP6_BASE,
            )
        } else {
            (format!("{}/32", Self::VIP), Self::NEXTHOP_GROUP, 0)
        };
        let via = |i: usize| -> String {
            if ipv6 {
                Self::mux_address_v6(i).to_string()
            } else {
                Self::mux_address(i).to_string()
            }
        };
        let nexthop_id = |i: usize| base + u32::try_from(i).expect("i <= 9");
        if muxes.is_empty() {
            let present = self.router.ip(&[family, "route", "show", &vip])?;
            if !present.trim().is_empty() {
                self.router.ip(&[family, "route", "del", &vip])?;
            }
            return Ok(());
        }
        if self.plan.resilient {
            for &i in muxes {
                let via = via(i);
                let dev = format!("r-m{i}");
                let id = nexthop_id(i).to_string();
                self.router
                    .ip(&["nexthop", "replace", "id", &id, "via", &via, "dev", &dev])?;
            }
            let group = muxes
                .iter()
                .map(|&i| nexthop_id(i).to_string())
                .collect::<Vec<_>>()
                .join("/");
            let group_id = group_id.to_string();
            self.router.ip(&[
                "nexthop",
                "replace",
                "id",
                &group_id,
                "group",
                &group,
                "type",
                "resilient",
                "buckets",
                "64",
                "idle_timer",
                "0",
            ])?;
            self.router
                .ip(&[family, "route", "replace", &vip, "nhid", &group_id])?;
        } else {
            let mut args = vec![
                family.to_owned(),
                "route".to_owned(),
                "replace".to_owned(),
                vip,
            ];
            for &i in muxes {
                args.extend(
                    [
                        "nexthop",
                        "via",
                        &via(i),
                        "dev",
                        &format!("r-m{i}"),
                        "weight",
                        "1",
                    ]
                    .map(str::to_owned),
                );
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.router.ip(&args)?;
        }
        Ok(())
    }

    /// Adds the VIP to `lo` of every backend (direct server return: backends answer from it),
    /// and with [`FleetPlan::ipv6`] [`VIP6`](Self::VIP6)/128 as well.
    pub fn add_backend_vips(&self) -> io::Result<()> {
        let vip = format!("{}/32", Self::VIP);
        let vip6 = format!("{}/128", Self::VIP6);
        for be in &self.backends {
            be.ip(&["addr", "add", &vip, "dev", "lo"])?;
            if self.plan.ipv6 {
                be.ip(&["-6", "addr", "add", &vip6, "dev", "lo", "nodad"])?;
            }
        }
        Ok(())
    }

    /// Adds an "internet" host to `lab`: namespace `inet`, link `i0` [`INTERNET`](Self::INTERNET)/24
    /// to the router's `r-i` [`INTERNET_GATEWAY`](Self::INTERNET_GATEWAY) (MTU
    /// [`INNER_MTU`](Self::INNER_MTU)), default route via the router, and checksum offload off
    /// (a userspace mux copies the bytes as they are, so they must be complete).
    pub fn add_internet(&self, lab: &mut Lab) -> io::Result<Namespace> {
        let internet = lab.namespace("inet")?;
        lab.veth(
            VethEnd::new(
                &self.router,
                "r-i",
                &format!("{}/24", Self::INTERNET_GATEWAY),
            ),
            VethEnd::new(&internet, "i0", &format!("{}/24", Self::INTERNET)),
            Self::INNER_MTU,
        )?;
        internet.ip(&[
            "route",
            "add",
            "default",
            "via",
            &Self::INTERNET_GATEWAY.to_string(),
        ])?;
        internet.exec_checked("ethtool", &["-K", "i0", "tx", "off"])?;
        Ok(internet)
    }

    /// Every VIP of the fleet: [`VIP`](Self::VIP), and [`VIP6`](Self::VIP6) when dual stack.
    pub fn vips(&self) -> Vec<IpAddr> {
        let mut v = vec![IpAddr::V4(Self::VIP)];
        if self.plan.ipv6 {
            v.push(IpAddr::V6(Self::VIP6));
        }
        v
    }
}

// Nexthop ids never collide: IPv4 nexthops 1..=9, IPv6 ones NEXTHOP6_BASE + 1..=9, the groups.
const _: () = assert!(
    Fleet::NEXTHOP6_BASE >= Fleet::MAX_MUXES as u32
        && Fleet::NEXTHOP6_BASE + (Fleet::MAX_MUXES as u32) < Fleet::NEXTHOP_GROUP
        && Fleet::NEXTHOP_GROUP6 > Fleet::NEXTHOP_GROUP
);

/// Adds `addr`/64 to `ifname` in `ns`, usable at once (no duplicate address detection).
fn add_v6(ns: &Namespace, ifname: &str, addr: Ipv6Addr) -> io::Result<()> {
    let cidr = format!("{addr}/64");
    ns.ip(&["-6", "addr", "add", &cidr, "dev", ifname, "nodad"])?;
    Ok(())
}

/// 2001:2:0:`subnet`::`host`, the subnet written with the digits of the IPv4 third octet.
fn v6(subnet: u8, host: u16) -> Ipv6Addr {
    let digits = u16::from_str_radix(&subnet.to_string(), 16).expect("decimal digits are hex");
    Ipv6Addr::new(0x2001, 2, 0, digits, 0, 0, 0, host)
}

/// Third octet `base + n` for host `n` in 1..=max.
fn subnet(base: u8, n: usize, max: usize, what: &str) -> u8 {
    assert!(
        (1..=max).contains(&n),
        "{what} {n} is outside the addressing plan (1 to {max})"
    );
    base + u8::try_from(n).expect("n <= max <= 9")
}

fn cidr24(addr: Ipv4Addr) -> String {
    format!("{addr}/24")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressing_follows_lbtopo() {
        assert_eq!(Fleet::mux_address(1), Ipv4Addr::new(198, 18, 11, 2));
        assert_eq!(Fleet::router_mux_side(9), Ipv4Addr::new(198, 18, 19, 1));
        assert_eq!(Fleet::backend_address(2), Ipv4Addr::new(198, 18, 22, 2));
        assert_eq!(Fleet::router_backend_side(9), Ipv4Addr::new(198, 18, 29, 1));
        for i in 1..=9 {
            for a in [Fleet::mux_address(i), Fleet::backend_address(i)] {
                assert_eq!(a.octets()[..2], [198, 18]);
                assert_ne!(a, Fleet::VIP);
            }
        }
    }

    #[test]
    fn ipv6_addressing_mirrors_the_ipv4_plan() {
        assert_eq!(
            Fleet::mux_address_v6(1),
            "2001:2:0:11::2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            Fleet::router_mux_side_v6(9),
            "2001:2:0:19::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            Fleet::backend_address_v6(2),
            "2001:2:0:22::2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            Fleet::router_backend_side_v6(9),
            "2001:2:0:29::1".parse::<Ipv6Addr>().unwrap()
        );
        // 2001:2::/48: the first three groups.
        let in_range = |a: Ipv6Addr| a.segments()[..3] == [0x2001, 2, 0];
        for i in 1..=9 {
            for a in [
                Fleet::mux_address_v6(i),
                Fleet::router_mux_side_v6(i),
                Fleet::backend_address_v6(i),
                Fleet::router_backend_side_v6(i),
            ] {
                assert!(in_range(a), "{a}");
                assert_ne!(a, Fleet::VIP6);
            }
        }
        for a in [Fleet::VIP6, Fleet::CLIENT6, Fleet::ROUTER_CLIENT_SIDE6] {
            assert!(in_range(a), "{a}");
        }
    }

    #[test]
    #[should_panic(expected = "mux 10 is outside the addressing plan (1 to 9)")]
    fn tenth_mux_is_refused() {
        let _ = Fleet::mux_address(10);
    }
}
