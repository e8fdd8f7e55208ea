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

use std::io;
use std::net::Ipv4Addr;

use crate::netns::{Lab, Namespace, VethEnd};

/// What [`Fleet::build`] builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FleetPlan {
    /// Number of muxes, 1 to [`Fleet::MAX_MUXES`].
    pub muxes: usize,
    /// Number of backends, 1 to [`Fleet::MAX_BACKENDS`].
    pub backends: usize,
    /// The router's VIP route uses a resilient nexthop group (only a lost mux's flows move)
    /// instead of a plain multipath route (up to half of the flows may move).
    pub resilient: bool,
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

        lab.veth(
            VethEnd::new(&client, "c0", &cidr24(Self::CLIENT)),
            VethEnd::new(&router, "r-c", &cidr24(Self::ROUTER_CLIENT_SIDE)),
            Self::CLIENT_MTU,
        )?;
        client.exec_checked("ethtool", &["-K", "c0", "tx", "off"])?;
        let gw = Self::ROUTER_CLIENT_SIDE.to_string();
        client.ip(&["route", "add", "default", "via", &gw])?;

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
    /// nexthop group (id 100, 64 buckets, nexthop ids = mux indices). An empty list removes
    /// the route.
    pub fn route_vip_via(&self, muxes: &[usize]) -> io::Result<()> {
        if let Some(&bad) = muxes.iter().find(|&&i| i == 0 || i > self.plan.muxes) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no mux {bad} (fleet has {})", self.plan.muxes),
            ));
        }
        let vip = format!("{}/32", Self::VIP);
        if muxes.is_empty() {
            let present = self.router.ip(&["route", "show", &vip])?;
            if !present.trim().is_empty() {
                self.router.ip(&["route", "del", &vip])?;
            }
            return Ok(());
        }
        if self.plan.resilient {
            for &i in muxes {
                let via = Self::mux_address(i).to_string();
                let dev = format!("r-m{i}");
                let id = i.to_string();
                self.router
                    .ip(&["nexthop", "replace", "id", &id, "via", &via, "dev", &dev])?;
            }
            let group = muxes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("/");
            self.router.ip(&[
                "nexthop",
                "replace",
                "id",
                "100",
                "group",
                &group,
                "type",
                "resilient",
                "buckets",
                "64",
                "idle_timer",
                "0",
            ])?;
            self.router.ip(&["route", "replace", &vip, "nhid", "100"])?;
        } else {
            let mut args = vec!["route".to_owned(), "replace".to_owned(), vip];
            for &i in muxes {
                args.extend(
                    [
                        "nexthop",
                        "via",
                        &Self::mux_address(i).to_string(),
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

    /// Adds the VIP to `lo` of every backend (direct server return: backends answer from it).
    pub fn add_backend_vips(&self) -> io::Result<()> {
        let vip = format!("{}/32", Self::VIP);
        for be in &self.backends {
            be.ip(&["addr", "add", &vip, "dev", "lo"])?;
        }
        Ok(())
    }
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
    #[should_panic(expected = "mux 10 is outside the addressing plan (1 to 9)")]
    fn tenth_mux_is_refused() {
        let _ = Fleet::mux_address(10);
    }
}
