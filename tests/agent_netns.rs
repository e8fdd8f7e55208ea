//! `lb agent` with `lb mux` in network namespaces (root): real TCP from a client through the
//! router's ECMP route over two muxes to two backends, whose agents decapsulate into a TUN; the
//! servers (bound to the VIP) answer straight to the router: direct server return. A capture in
//! the router namespace (tcpdump) proves the replies never traverse a mux. Both encapsulations;
//! spoofed tunnel packets from a non-mux are dropped and counted. An agent killed with SIGKILL
//! (its egress rules left behind) restarts and serves again within a second.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddrV4;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb::netns::{Lab, require_root};
use lb::topology::{Fleet, FleetPlan};
use lb_dataplane::socket::request;
use serde_json::{Value, json};

const PORT_IPIP: u16 = 80;
const PORT_GRE: u16 = 8080;

fn vips_toml(backends: usize) -> String {
    let mut s = String::new();
    for (name, port, encap) in [("web", PORT_IPIP, "ipip"), ("web-gre", PORT_GRE, "gre")] {
        s.push_str(&format!(
            "\n[[vip]]\nname = \"{name}\"\naddress = \"{}\"\nprotocol = \"tcp\"\nport = {port}\nencap = \"{encap}\"\n",
            Fleet::VIP
        ));
        for j in 1..=backends {
            s.push_str(&format!(
                "  [[vip.backend]]\n  address = \"{}\"\n",
                Fleet::backend_address(j)
            ));
        }
    }
    s
}

#[test]
fn real_tcp_through_two_muxes_with_direct_server_return() {
    require_root("agent_netns::real_tcp_through_two_muxes_with_direct_server_return");
    let mut lab = Lab::new("agentdsr").unwrap();
    let fleet = Fleet::build(
        &mut lab,
        &FleetPlan {
            muxes: 2,
            backends: 2,
            resilient: false,
            ipv6: false,
        },
    )
    .unwrap();
    fleet.add_backend_vips().unwrap();
    let mut agents = Vec::new();
    for j in 1..=2 {
        let config = format!(
            "[node]\nname = \"be{j}\"\ninterface = \"b0\"\naddress_v4 = \"{}\"\ncontrol_socket = SOCKET\n\
             [agent]\nmuxes = [\"{}/32\", \"{}/32\"]\n{}",
            Fleet::backend_address(j),
            Fleet::mux_address(1),
            Fleet::mux_address(2),
            vips_toml(2)
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
    for i in 1..=2 {
        let config = format!(
            "[node]\nname = \"mux{i}\"\ninterface = \"m0\"\naddress_v4 = \"{}\"\nmtu = 1600\ncontrol_socket = SOCKET\n{}",
            Fleet::mux_address(i),
            vips_toml(2)
        );
        {
            let n = common::start_node(
                &mut lab,
                &fleet.muxes[i - 1],
                "mux",
                &format!("mux{i}"),
                &config,
                &["--no-metrics"],
            );
            (n.pid, n.socket)
        };
    }
    let stop = Arc::new(AtomicBool::new(false));
    for j in 1..=2 {
        for port in [PORT_IPIP, PORT_GRE] {
            common::http_server(
                &fleet.backends[j - 1],
                SocketAddrV4::new(Fleet::VIP, port).into(),
                format!("be{j}\n"),
                Arc::clone(&stop),
            );
        }
    }
    let on_mux_links: Vec<u32> = (1..=2)
        .map(|i| {
            common::capture(
                &mut lab,
                &fleet.router,
                &format!("r-m{i}"),
                &format!("src host {}", Fleet::VIP),
            )
        })
        .collect();
    let on_client_link = common::capture(
        &mut lab,
        &fleet.router,
        "r-c",
        &format!("src host {}", Fleet::VIP),
    );
    std::thread::sleep(Duration::from_millis(500));

    let mut answers: BTreeMap<(u16, String), u32> = BTreeMap::new();
    for port in [PORT_IPIP, PORT_GRE] {
        for _ in 0..30 {
            let who = common::http_get(&fleet.client, SocketAddrV4::new(Fleet::VIP, port).into())
                .unwrap_or_else(|e| {
                    panic!(
                        "request to port {port} failed: {e}\nagent1: {}\nmux1: {}",
                        request(&agents[0].1, &json!({"command": "status"}))
                            .map_or(String::new(), |v| v.to_string()),
                        lab.log(agents[0].0)
                    )
                });
            *answers.entry((port, who)).or_default() += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    for port in [PORT_IPIP, PORT_GRE] {
        let backends: Vec<&String> = answers
            .keys()
            .filter(|k| k.0 == port)
            .map(|k| &k.1)
            .collect();
        assert_eq!(
            backends,
            ["be1", "be2"],
            "port {port}: both backends answer: {answers:?}"
        );
    }
    let through_muxes: u64 = on_mux_links
        .into_iter()
        .map(|p| common::captured(&mut lab, p))
        .sum();
    let to_client = common::captured(&mut lab, on_client_link);
    assert_eq!(through_muxes, 0, "a reply crossed a mux link");
    assert!(
        to_client > 60,
        "replies reach the client directly: {to_client}"
    );

    // The agents delivered everything and rejected nothing.
    for (_, socket) in &agents {
        let s: Value = request(socket, &json!({"command": "status"})).unwrap();
        assert_eq!(s["healthy"], true, "{s}");
        assert!(s["counters"]["delivered"].as_u64().unwrap() > 0);
        assert_eq!(s["counters"]["rejected_foreign_source"], 0);
    }

    // A spoofed tunnel packet from the client (not a mux) is dropped and counted.
    let spoof = common_spoof();
    fleet
        .client
        .enter(move || common::send_raw(&spoof, Fleet::backend_address(1).into()))
        .join()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s: Value = request(&agents[0].1, &json!({"command": "status"})).unwrap();
        if s["counters"]["rejected_foreign_source"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "spoofed packet not counted: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
}

/// IP-in-IP from the client's address to backend 1, carrying UDP to the VIP.
fn common_spoof() -> Vec<u8> {
    let inner = {
        let b = etherparse::PacketBuilder::ipv4(Fleet::CLIENT.octets(), Fleet::VIP.octets(), 64)
            .udp(5555, 53);
        let mut v = Vec::new();
        b.write(&mut v, b"spoofed").unwrap();
        v
    };
    let mut outer = vec![0u8; 20];
    outer[0] = 0x45;
    outer[2..4].copy_from_slice(&((20 + inner.len()) as u16).to_be_bytes());
    outer[8] = 64;
    outer[9] = 4;
    outer[12..16].copy_from_slice(&Fleet::CLIENT.octets());
    outer[16..20].copy_from_slice(&Fleet::backend_address(1).octets());
    let sum = common::internet_checksum(&outer);
    outer[10..12].copy_from_slice(&sum.to_be_bytes());
    outer.extend_from_slice(&inner);
    outer
}

/// The agent's policy-routing rules in `ns` (both families), one per line, sorted: those of the
/// priorities it owns (4241 to 4243).
fn agent_rules(ns: &lb::netns::Namespace) -> Vec<String> {
    let mut rules: Vec<String> = ["-4", "-6"]
        .iter()
        .flat_map(|family| {
            ns.ip(&[family, "rule", "show"])
                .unwrap()
                .lines()
                .filter(|l| ["4241:", "4242:", "4243:"].iter().any(|p| l.starts_with(p)))
                .map(|l| format!("{family} {}", l.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    rules.sort();
    rules
}

#[test]
fn an_agent_killed_with_sigkill_restarts_and_serves_within_a_second() {
    require_root("agent_netns::an_agent_killed_with_sigkill_restarts_and_serves_within_a_second");
    let mut lab = Lab::new("agentkill").unwrap();
    let fleet = Fleet::build(
        &mut lab,
        &FleetPlan {
            muxes: 1,
            backends: 1,
            resilient: false,
            ipv6: true,
        },
    )
    .unwrap();
    fleet.add_backend_vips().unwrap();
    let (b4, b6) = (Fleet::backend_address(1), Fleet::backend_address_v6(1));
    let vips = format!(
        "\n[[vip]]\nname = \"web\"\naddress = \"{}\"\nprotocol = \"tcp\"\nport = {PORT_IPIP}\nencap = \"ipip\"\n\
         [[vip.backend]]\naddress = \"{b4}\"\n\
         [[vip]]\nname = \"web6\"\naddress = \"{}\"\nprotocol = \"tcp\"\nport = {PORT_IPIP}\nencap = \"ipip\"\n\
         [[vip.backend]]\naddress = \"{b6}\"\n\
         [[snat]]\naddress = \"{}\"\n[[snat]]\naddress = \"{}\"\n",
        Fleet::VIP,
        Fleet::VIP6,
        Fleet::VIP,
        Fleet::VIP6
    );
    // Egress SNAT in both families: the agent installs policy-routing rules of both.
    let agent_config = format!(
        "[node]\nname = \"be1\"\ninterface = \"b0\"\naddress_v4 = \"{b4}\"\naddress_v6 = \"{b6}\"\n\
         control_socket = SOCKET\n[agent]\nmuxes = [\"{}/32\"]\negress = [\"198.19.0.0/16\", \"2001:2:0:ff::/64\"]\n{vips}",
        Fleet::mux_address(1),
    );
    let be = &fleet.backends[0];
    let agent = common::start_node(
        &mut lab,
        be,
        "agent",
        "agent1",
        &agent_config,
        &["--no-metrics"],
    );
    common::start_node(
        &mut lab,
        &fleet.muxes[0],
        "mux",
        "mux1",
        &format!(
            "[node]\nname = \"mux1\"\ninterface = \"m0\"\naddress_v4 = \"{}\"\naddress_v6 = \"{}\"\n\
             mtu = 1600\ncontrol_socket = SOCKET\n{vips}",
            Fleet::mux_address(1),
            Fleet::mux_address_v6(1)
        ),
        &["--no-metrics"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let vip = SocketAddrV4::new(Fleet::VIP, PORT_IPIP);
    common::http_server(be, vip.into(), "be1\n".into(), Arc::clone(&stop));
    assert_eq!(common::http_get(&fleet.client, vip.into()).unwrap(), "be1");
    let installed = agent_rules(be);
    assert!(
        installed.iter().any(|r| r.starts_with("-4 4242:"))
            && installed.iter().any(|r| r.starts_with("-6 4242:")),
        "{installed:?}"
    );

    // SIGKILL: no cleanup. The rules stay behind (and the socket file); an older agent's
    // IPv6 rule of another shape (`from` the host's address) is left there too.
    lab.signal(agent.pid, libc::SIGKILL).unwrap();
    assert!(lab.wait(agent.pid, Duration::from_secs(5)).is_some());
    assert_eq!(
        agent_rules(be),
        installed,
        "a killed agent leaves its rules"
    );
    assert!(agent.socket.exists());
    // (The agents before this change installed exactly that rule: then it is there already.)
    let _ = be.ip(&[
        "-6",
        "rule",
        "add",
        "from",
        &b6.to_string(),
        "to",
        "2001:2:0:ff::/64",
        "lookup",
        "4242",
        "priority",
        "4242",
    ]);

    // Restarted (as systemd's Restart=always would): it starts, replaces the rules and serves.
    let started = Instant::now();
    let again = common::restart_node(&mut lab, be, "agent", "agent1", &agent, &["--no-metrics"]);
    let served = loop {
        match common::http_get(&fleet.client, vip.into()) {
            Ok(who) => break who,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(5),
                "the restarted agent does not serve: {e}\n{}",
                lab.log(again.pid)
            ),
        }
    };
    let took = started.elapsed();
    assert_eq!(served, "be1");
    assert!(
        took < Duration::from_secs(1),
        "serving again took {took:?}\n{}",
        lab.log(again.pid)
    );
    assert_eq!(agent_rules(be), installed, "the same rules, once each");
    assert!(
        lab.log(again.pid).contains("left behind"),
        "the stale rules are reported: {}",
        lab.log(again.pid)
    );
    let s: Value = request(&again.socket, &json!({"command": "status"})).unwrap();
    assert_eq!(s["healthy"], true, "{s}");

    // A clean stop removes them.
    lab.signal(again.pid, libc::SIGTERM).unwrap();
    assert!(lab.wait(again.pid, Duration::from_secs(5)).is_some());
    assert_eq!(agent_rules(be), Vec::<String>::new());
    stop.store(true, Ordering::Relaxed);
}
