//! IPv6 VIPs end to end (root): `lb agent` with `lb mux` in a dual-stack namespace fleet
//! ([`FleetPlan::ipv6`]). Real TCP from the client to [`Fleet::VIP6`] goes through the router's
//! ECMP route over two muxes, which encapsulate to the backends' IPv6 addresses (IPv6-in-IPv6,
//! protocol 41, and GRE over IPv6); the agents decapsulate into their TUN and the servers,
//! bound to the VIP, answer straight to the router (direct server return). Mixed families as
//! well: the IPv4 VIP carried in IPv6 (IPv4-in-IPv6), and the IPv6 VIP carried in IPv4
//! (IPv6-in-IPv4, GRE over IPv4). Captures in the router namespace (tcpdump) prove that no
//! reply traverses a mux, and which outer headers the backends' links carried. A spoofed
//! IPv6-in-IPv6 packet from a non-mux is dropped and counted.
//!
//! Every test needs root and fails with `require_root`'s message otherwise.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb::netns::{Lab, require_root};
use lb::topology::{Fleet, FleetPlan};
use lb_dataplane::socket::request;
use serde_json::{Value, json};

/// Requests per service; each must reach both backends.
const REQUESTS: usize = 24;

/// One `[[vip]]` of a scenario.
#[derive(Clone, Copy, Debug)]
struct Service {
    name: &'static str,
    vip: IpAddr,
    port: u16,
    encap: &'static str,
}

/// Which outer family the muxes use to reach the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outer {
    V4,
    V6,
}

fn backend_address(j: usize, outer: Outer) -> IpAddr {
    match outer {
        Outer::V4 => Fleet::backend_address(j).into(),
        Outer::V6 => Fleet::backend_address_v6(j).into(),
    }
}

fn mux_prefix(i: usize, outer: Outer) -> String {
    match outer {
        Outer::V4 => format!("{}/32", Fleet::mux_address(i)),
        Outer::V6 => format!("{}/128", Fleet::mux_address_v6(i)),
    }
}

/// `node.address_v4` or `node.address_v6`, whichever `outer` needs.
fn node_address(address: IpAddr) -> String {
    match address {
        IpAddr::V4(a) => format!("address_v4 = \"{a}\""),
        IpAddr::V6(a) => format!("address_v6 = \"{a}\""),
    }
}

fn vips_toml(services: &[Service], outer: Outer, backends: usize) -> String {
    let mut s = String::new();
    for svc in services {
        s.push_str(&format!(
            "\n[[vip]]\nname = \"{}\"\naddress = \"{}\"\nprotocol = \"tcp\"\nport = {}\nencap = \"{}\"\n",
            svc.name, svc.vip, svc.port, svc.encap
        ));
        for j in 1..=backends {
            s.push_str(&format!(
                "  [[vip.backend]]\n  address = \"{}\"\n",
                backend_address(j, outer)
            ));
        }
    }
    s
}

fn status(socket: &Path) -> Value {
    request(socket, &json!({"command": "status"})).unwrap()
}

/// A dual-stack fleet of 2 muxes and 2 backends, after checking its IPv6 settings.
fn dual_stack_fleet(lab: &mut Lab, resilient: bool) -> Fleet {
    let fleet = Fleet::build(
        lab,
        &FleetPlan {
            muxes: 2,
            backends: 2,
            resilient,
            ipv6: true,
        },
    )
    .unwrap();
    let router = &fleet.router;
    assert_eq!(
        router.read_sysctl("net.ipv6.conf.all.forwarding").unwrap(),
        "1"
    );
    assert_eq!(
        router
            .read_sysctl("net.ipv6.fib_multipath_hash_policy")
            .unwrap(),
        "1"
    );
    for ns in fleet
        .muxes
        .iter()
        .chain(&fleet.backends)
        .chain([&fleet.client, &fleet.router])
    {
        assert_eq!(
            ns.read_sysctl("net.ipv6.conf.all.accept_dad").unwrap(),
            "0",
            "{ns}"
        );
    }
    for ns in fleet
        .muxes
        .iter()
        .chain(&fleet.backends)
        .chain([&fleet.client])
    {
        // Muxes above all: they must not forward the VIP6 packets they receive.
        assert_eq!(
            ns.read_sysctl("net.ipv6.conf.all.forwarding").unwrap(),
            "0",
            "{ns}"
        );
    }
    // Addresses are usable at once: none is tentative.
    for ns in fleet.muxes.iter().chain(&fleet.backends) {
        let addrs = ns.ip(&["-6", "addr"]).unwrap();
        assert!(!addrs.contains("tentative"), "{ns}: {addrs}");
        assert!(
            !addrs.contains(&Fleet::VIP6.to_string()),
            "{ns} has no VIP6 by default"
        );
    }
    fleet
}

/// Runs one scenario: agents on both backends, muxes on both mux hosts, an HTTP server per
/// service on each backend, `REQUESTS` real TCP requests per service, all through the muxes
/// with `outer` headers. Checks that both backends answer every service, that no packet from a
/// VIP crosses a mux link while many cross the client link, that every `wire` filter matched
/// many packets on the backend links (`true`) or none (`false`), and that the
/// agents delivered and rejected nothing. Returns the lab, fleet and the agents' sockets.
fn scenario(
    tag: &str,
    services: &[Service],
    outer: Outer,
    wire: &[(&str, bool)],
) -> (Lab, Fleet, Vec<PathBuf>, Arc<AtomicBool>) {
    let mut lab = Lab::new(tag).unwrap();
    let fleet = dual_stack_fleet(&mut lab, false);
    fleet.add_backend_vips().unwrap();
    let mut agents = Vec::new();
    for j in 1..=2 {
        let config = format!(
            "[node]\nname = \"be{j}\"\ninterface = \"b0\"\n{}\ncontrol_socket = SOCKET\n\
             [agent]\nmuxes = [\"{}\", \"{}\"]\n{}",
            node_address(backend_address(j, outer)),
            mux_prefix(1, outer),
            mux_prefix(2, outer),
            vips_toml(services, outer, 2)
        );
        agents.push({
            let n = common::start_node(
                &mut lab,
                &fleet.backends[j - 1],
                "agent",
                &format!("agent{j}"),
                &config,
                &["--no-metrics"],
            );
            (n.pid, n.socket)
        });
    }
    let mut muxes = Vec::new();
    for i in 1..=2 {
        let address: IpAddr = match outer {
            Outer::V4 => Fleet::mux_address(i).into(),
            Outer::V6 => Fleet::mux_address_v6(i).into(),
        };
        let config = format!(
            "[node]\nname = \"mux{i}\"\ninterface = \"m0\"\n{}\nmtu = 1600\ncontrol_socket = SOCKET\n{}",
            node_address(address),
            vips_toml(services, outer, 2)
        );
        muxes.push({
            let n = common::start_node(
                &mut lab,
                &fleet.muxes[i - 1],
                "mux",
                &format!("mux{i}"),
                &config,
                &["--no-metrics"],
            );
            (n.pid, n.socket)
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    for j in 1..=2 {
        for svc in services {
            common::http_server(
                &fleet.backends[j - 1],
                SocketAddr::new(svc.vip, svc.port),
                format!("be{j}\n"),
                Arc::clone(&stop),
            );
        }
    }
    let from_vips = format!("src host {} or src host {}", Fleet::VIP, Fleet::VIP6);
    let on_mux_links: Vec<u32> = (1..=2)
        .map(|i| common::capture(&mut lab, &fleet.router, &format!("r-m{i}"), &from_vips))
        .collect();
    let on_client_link = common::capture(&mut lab, &fleet.router, "r-c", &from_vips);
    let on_backend_links: Vec<(&str, bool, [u32; 2])> = wire
        .iter()
        .map(|&(filter, expected)| {
            let pids = [1, 2]
                .map(|j| common::capture(&mut lab, &fleet.router, &format!("r-b{j}"), filter));
            (filter, expected, pids)
        })
        .collect();

    let mut answers: BTreeMap<(&str, String), u32> = BTreeMap::new();
    for svc in services {
        for _ in 0..REQUESTS {
            let who = common::http_get(&fleet.client, SocketAddr::new(svc.vip, svc.port))
                .unwrap_or_else(|e| {
                    panic!(
                        "request to {} ([{}]:{}) failed: {e}\nagent1: {}\nagent1 log: {}",
                        svc.name,
                        svc.vip,
                        svc.port,
                        status(&agents[0].1),
                        lab.log(agents[0].0)
                    )
                });
            *answers.entry((svc.name, who)).or_default() += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    for svc in services {
        let backends: Vec<&String> = answers
            .keys()
            .filter(|k| k.0 == svc.name)
            .map(|k| &k.1)
            .collect();
        assert_eq!(
            backends,
            ["be1", "be2"],
            "{}: both backends answer: {answers:?}",
            svc.name
        );
    }
    let through_muxes: u64 = on_mux_links
        .into_iter()
        .map(|p| common::captured(&mut lab, p))
        .sum();
    let to_client = common::captured(&mut lab, on_client_link);
    assert_eq!(through_muxes, 0, "a reply crossed a mux link");
    let requests = (services.len() * REQUESTS) as u64;
    assert!(
        to_client > 2 * requests,
        "replies reach the client directly: {to_client} packets for {requests} requests"
    );
    for (filter, expected, pids) in on_backend_links {
        let n: u64 = pids
            .into_iter()
            .map(|p| common::captured(&mut lab, p))
            .sum();
        if expected {
            // A request is at least 15 tunnel packets (SYN, 14 full segments, ACKs, FIN).
            let least = 10 * REQUESTS as u64;
            assert!(
                n > least,
                "only {n} packets on the backend links match `{filter}`"
            );
        } else {
            assert_eq!(n, 0, "packets on the backend links match `{filter}`");
        }
    }
    for (_, socket) in &muxes {
        let s = status(socket);
        let c = &s["counters"];
        assert!(c["encapsulated"].as_u64().unwrap() > 0, "{s}");
        // Nothing refused by the kernel (EMSGSIZE would be a full-size segment too big).
        assert_eq!(c["send_failed"], 0, "{s}");
        assert_eq!(c["icmp_too_big_sent"], 0, "{s}");
    }
    for (_, socket) in &agents {
        let s = status(socket);
        assert_eq!(s["healthy"], true, "{s}");
        assert!(s["counters"]["delivered"].as_u64().unwrap() > 0, "{s}");
        for reason in [
            "malformed",
            "bad_checksum",
            "foreign_source",
            "unknown_vip",
            "lookup_budget",
            "relay_budget",
        ] {
            assert_eq!(
                s["counters"][format!("rejected_{reason}")],
                0,
                "{reason}: {s}"
            );
        }
        assert_eq!(s["counters"]["tun_errors"], 0, "{s}");
    }
    let sockets = agents.into_iter().map(|(_, s)| s).collect();
    (lab, fleet, sockets, stop)
}

#[test]
fn ipv6_vips_through_two_muxes_over_ipv6_outer_headers() {
    require_root("agent_netns_v6::ipv6_vips_through_two_muxes_over_ipv6_outer_headers");
    let services = [
        // IPv6-in-IPv6: protocol 41 in an IPv6 outer header.
        Service {
            name: "web6",
            vip: Fleet::VIP6.into(),
            port: 80,
            encap: "ipip",
        },
        // GRE over IPv6.
        Service {
            name: "web6-gre",
            vip: Fleet::VIP6.into(),
            port: 8080,
            encap: "gre",
        },
        // Mixed: the IPv4 VIP in IPv6 (protocol 4 in an IPv6 outer header).
        Service {
            name: "web4in6",
            vip: Fleet::VIP.into(),
            port: 80,
            encap: "ipip",
        },
    ];
    let (lab, fleet, agents, stop) = scenario(
        "agentv6",
        &services,
        Outer::V6,
        &[
            ("ip6 proto 41", true),
            ("ip6 proto 47", true),
            ("ip6 proto 4", true),
            // Full-size segments in the tunnel: frames of 14 + 40 + 1500 bytes and more.
            ("ip6 and greater 1550", true),
            // No tunnel packet with an IPv4 outer header.
            ("ip proto 4 or ip proto 41 or ip proto 47", false),
        ],
    );

    // A spoofed IPv6-in-IPv6 packet from the client (not a mux) is dropped and counted.
    let spoof = spoofed_6in6();
    fleet
        .client
        .enter(move || common::send_raw(&spoof, Fleet::backend_address_v6(1).into()))
        .join()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = status(&agents[0]);
        if s["counters"]["rejected_foreign_source"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "spoofed packet not counted: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    drop(lab);
}

#[test]
fn ipv6_vip_over_ipv4_outer_headers() {
    require_root("agent_netns_v6::ipv6_vip_over_ipv4_outer_headers");
    let services = [
        // IPv6-in-IPv4: protocol 41 in an IPv4 outer header.
        Service {
            name: "web6in4",
            vip: Fleet::VIP6.into(),
            port: 80,
            encap: "ipip",
        },
        // IPv6 in GRE over IPv4.
        Service {
            name: "web6-gre4",
            vip: Fleet::VIP6.into(),
            port: 8080,
            encap: "gre",
        },
    ];
    let (lab, _fleet, _agents, stop) = scenario(
        "agent6in4",
        &services,
        Outer::V4,
        &[
            ("ip proto 41", true),
            ("ip proto 47", true),
            // Full-size segments in the tunnel: frames of 14 + 20 + 1500 bytes and more.
            ("ip and greater 1530", true),
            ("ip6 proto 4 or ip6 proto 41 or ip6 proto 47", false),
        ],
    );
    stop.store(true, Ordering::Relaxed);
    drop(lab);
}

#[test]
fn dual_stack_fleet_routes_vip6_over_the_muxes_with_resilient_groups() {
    require_root(
        "agent_netns_v6::dual_stack_fleet_routes_vip6_over_the_muxes_with_resilient_groups",
    );
    let mut lab = Lab::new("fleetv6").unwrap();
    let fleet = dual_stack_fleet(&mut lab, true);
    let vip6 = format!("{}/128", Fleet::VIP6);
    let route = fleet.router.ip(&["-6", "route", "show", &vip6]).unwrap();
    assert!(
        route.contains(&format!("nhid {}", Fleet::NEXTHOP_GROUP6)),
        "{route}"
    );
    let group = fleet
        .router
        .ip(&["nexthop", "show", "id", &Fleet::NEXTHOP_GROUP6.to_string()])
        .unwrap();
    assert!(group.contains("resilient"), "{group}");
    assert!(group.contains("group 61/62"), "{group}");
    // The IPv4 route keeps its own group and nexthops.
    let route4 = fleet
        .router
        .ip(&["route", "show", &format!("{}/32", Fleet::VIP)])
        .unwrap();
    assert!(
        route4.contains(&format!("nhid {}", Fleet::NEXTHOP_GROUP)),
        "{route4}"
    );
    for i in 1..=2 {
        let nh = fleet
            .router
            .ip(&[
                "nexthop",
                "show",
                "id",
                &(Fleet::NEXTHOP6_BASE + i).to_string(),
            ])
            .unwrap();
        assert!(
            nh.contains(&Fleet::mux_address_v6(i as usize).to_string()),
            "{nh}"
        );
    }
    fleet.route_vip_via(&[2]).unwrap();
    let group = fleet
        .router
        .ip(&["nexthop", "show", "id", &Fleet::NEXTHOP_GROUP6.to_string()])
        .unwrap();
    assert!(group.contains("group 62 "), "{group}");
    fleet.route_vip_via(&[]).unwrap();
    assert!(
        fleet
            .router
            .ip(&["-6", "route", "show", &vip6])
            .unwrap()
            .trim()
            .is_empty()
    );

    // IPv6 forwarding through the router: client → backend 1 over TCP.
    let listener_at = SocketAddr::new(Fleet::backend_address_v6(1).into(), 9000);
    let (tx, rx) = std::sync::mpsc::channel();
    let server = fleet.backend(1).enter(move || {
        let listener = TcpListener::bind(listener_at).unwrap();
        tx.send(()).unwrap();
        let (mut conn, from) = listener.accept().unwrap();
        conn.write_all(b"hi").unwrap();
        from
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let got = fleet
        .client
        .enter(move || {
            let mut c = TcpStream::connect_timeout(&listener_at, Duration::from_secs(5)).unwrap();
            let mut s = String::new();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.read_to_string(&mut s).unwrap();
            s
        })
        .join()
        .unwrap();
    assert_eq!(got, "hi");
    assert_eq!(server.join().unwrap().ip(), IpAddr::V6(Fleet::CLIENT6));
}

/// IPv6-in-IPv6 from the client's address to backend 1, carrying UDP to VIP6.
fn spoofed_6in6() -> Vec<u8> {
    let inner = {
        let b = etherparse::PacketBuilder::ipv6(Fleet::CLIENT6.octets(), Fleet::VIP6.octets(), 64)
            .udp(5555, 53);
        let mut v = Vec::new();
        b.write(&mut v, b"spoofed").unwrap();
        v
    };
    let mut outer = vec![0u8; 40];
    outer[0] = 0x60;
    outer[4..6].copy_from_slice(&(inner.len() as u16).to_be_bytes());
    outer[6] = 41;
    outer[7] = 64;
    outer[8..24].copy_from_slice(&Fleet::CLIENT6.octets());
    outer[24..40].copy_from_slice(&Fleet::backend_address_v6(1).octets());
    outer.extend_from_slice(&inner);
    outer
}
