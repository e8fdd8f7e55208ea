//! Egress SNAT (Ananta) in network namespaces (root): every backend opens TCP connections and
//! sends UDP datagrams to an "internet" host at once. They leave with the VIP as source (the
//! agent translates them to a port of its own ranges), the replies come back to the VIP through
//! either mux, which sends each to the owner of its port's range, and the agent translates them
//! back. The internet host sees only the VIP; every port used belongs to the backend that used
//! it.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lb::netns::{Lab, Namespace, require_root};
use lb::topology::{Fleet, FleetPlan};
use lb_core::config::Config;
use lb_core::snat::PortRanges;
use lb_dataplane::socket::request;
use serde_json::{Value, json};

const INTERNET: std::net::Ipv4Addr = Fleet::INTERNET;
const TCP_ECHO: u16 = 7000;
const UDP_ECHO: u16 = 7001;
const CONNECTIONS: usize = 25;

fn fleet_config() -> String {
    let mut s = format!(
        "\n[[vip]]\nname = \"web\"\naddress = \"{}\"\nprotocol = \"tcp\"\nport = 80\nencap = \"ipip\"\n",
        Fleet::VIP
    );
    for j in 1..=2 {
        s.push_str(&format!(
            "  [[vip.backend]]\n  address = \"{}\"\n",
            Fleet::backend_address(j)
        ));
    }
    s.push_str(&format!(
        "\n[[snat]]\naddress = \"{}\"\nfirst_port = 1024\nlast_port = 65535\nrange_size = 8\n",
        Fleet::VIP
    ));
    s
}

fn start(lab: &mut Lab, ns: &Namespace, what: &str, name: &str, text: &str) -> std::path::PathBuf {
    common::start_node(lab, ns, what, name, text, &["--no-metrics"]).socket
}

/// The internet host's echo servers; they record who they saw.
fn echo_servers(ns: &Namespace, peers: Arc<Mutex<Vec<SocketAddr>>>, stop: Arc<AtomicBool>) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    {
        let peers = Arc::clone(&peers);
        let stop = Arc::clone(&stop);
        let ready = ready_tx.clone();
        ns.enter(move || {
            let listener = TcpListener::bind(SocketAddrV4::new(INTERNET, TCP_ECHO)).unwrap();
            listener.set_nonblocking(true).unwrap();
            ready.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let Ok((conn, peer)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                peers.lock().unwrap().push(peer);
                std::thread::spawn(move || {
                    conn.set_nonblocking(false).unwrap();
                    let mut w = conn.try_clone().unwrap();
                    for line in BufReader::new(conn).lines() {
                        let Ok(line) = line else { return };
                        if writeln!(w, "{line}").is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }
    ns.enter(move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(INTERNET, UDP_ECHO)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                peers.lock().unwrap().push(peer);
                let _ = socket.send_to(&buf[..n], peer);
            }
        }
    });
    for _ in 0..2 {
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}

#[test]
fn every_backend_reaches_the_internet_with_the_vip_as_source() {
    require_root("snat_netns::every_backend_reaches_the_internet_with_the_vip_as_source");
    let mut lab = Lab::new("snat").unwrap();
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
    let internet = fleet.add_internet(&mut lab).unwrap();
    let muxes = format!(
        "[\"{}/32\", \"{}/32\"]",
        Fleet::mux_address(1),
        Fleet::mux_address(2)
    );
    let mut agents = Vec::new();
    for j in 1..=2 {
        let text = format!(
            "[node]\nname = \"be{j}\"\ninterface = \"b0\"\naddress_v4 = \"{}\"\ncontrol_socket = SOCKET\n\
             [agent]\nmuxes = {muxes}\negress = [\"198.19.0.0/16\"]\n{}",
            Fleet::backend_address(j),
            fleet_config()
        );
        agents.push(start(
            &mut lab,
            &fleet.backends[j - 1],
            "agent",
            &format!("agent{j}"),
            &text,
        ));
    }
    let mut mux_sockets = Vec::new();
    for i in 1..=2 {
        let text = format!(
            "[node]\nname = \"mux{i}\"\ninterface = \"m0\"\naddress_v4 = \"{}\"\nmtu = 1600\ncontrol_socket = SOCKET\n{}",
            Fleet::mux_address(i),
            fleet_config()
        );
        mux_sockets.push(start(
            &mut lab,
            &fleet.muxes[i - 1],
            "mux",
            &format!("mux{i}"),
            &text,
        ));
    }
    let peers = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    echo_servers(&internet, Arc::clone(&peers), Arc::clone(&stop));

    // All backends at once: TCP connections and UDP datagrams to the internet host.
    let workers: Vec<_> = (1..=2)
        .map(|j| {
            fleet.backends[j - 1].enter(move || {
                let tcp: Vec<_> = (0..CONNECTIONS)
                    .map(|n| {
                        std::thread::spawn(move || -> Result<(), String> {
                            let c = TcpStream::connect_timeout(
                                &SocketAddrV4::new(INTERNET, TCP_ECHO).into(),
                                Duration::from_secs(5),
                            )
                            .map_err(|e| format!("be{j} connect {n}: {e}"))?;
                            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                            let mut w = c.try_clone().unwrap();
                            let mut r = BufReader::new(c);
                            for k in 0..3 {
                                writeln!(w, "be{j} {n} {k}").map_err(|e| e.to_string())?;
                                let mut line = String::new();
                                r.read_line(&mut line)
                                    .map_err(|e| format!("be{j} read {n}: {e}"))?;
                                if line.trim() != format!("be{j} {n} {k}") {
                                    return Err(format!("bad echo {line:?}"));
                                }
                            }
                            Ok(())
                        })
                    })
                    .collect();
                let mut results: Vec<Result<(), String>> =
                    tcp.into_iter().map(|t| t.join().unwrap()).collect();
                // A connected UDP socket, as resolvers and QUIC clients use: its source is
                // chosen before the route, so the policy rule sees the host's address.
                let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
                udp.connect(SocketAddrV4::new(INTERNET, UDP_ECHO)).unwrap();
                udp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                for k in 0..10 {
                    let message = format!("udp be{j} {k}");
                    udp.send(message.as_bytes()).unwrap();
                    let mut buf = [0u8; 256];
                    results.push(match udp.recv_from(&mut buf) {
                        Ok((n, _)) if &buf[..n] == message.as_bytes() => Ok(()),
                        Ok((n, _)) => Err(format!("bad UDP echo {:?}", &buf[..n])),
                        Err(e) => Err(format!("be{j} UDP {k}: {e}")),
                    });
                }
                results
            })
        })
        .collect();
    let results: Vec<Result<(), String>> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let agent_status: Vec<Value> = agents
        .iter()
        .map(|s| request(s, &json!({"command": "status"})).unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} failed: {failures:?}\nagents: {agent_status:#?}",
        failures.len(),
        results.len()
    );

    // The internet saw only the VIP, and each port belongs to a backend's own ranges.
    let config = Config::from_toml(
        &format!("[node]\naddress_v4 = \"198.18.11.2\"\n{}", fleet_config()),
        "t",
    )
    .unwrap();
    let ranges = PortRanges::build(
        &config.snats[0],
        &config.snat_backends(IpAddr::V4(Fleet::VIP)),
    );
    let peers = peers.lock().unwrap().clone();
    assert_eq!(peers.len(), 2 * (CONNECTIONS + 10));
    let mut per_backend: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for peer in &peers {
        assert_eq!(peer.ip(), IpAddr::V4(Fleet::VIP), "the internet saw {peer}");
        let owner = ranges.owner(peer.port()).expect("a port of the SNAT space");
        *per_backend.entry(owner).or_default() += 1;
    }
    assert_eq!(per_backend.len(), 2, "{per_backend:?}");
    assert!(
        per_backend.values().all(|&n| n == CONNECTIONS + 10),
        "{per_backend:?}"
    );
    for s in &agent_status {
        let c = &s["counters"];
        assert!(c["snat_outbound"].as_u64().unwrap() > 0, "{s}");
        assert!(c["snat_inbound"].as_u64().unwrap() > 0, "{s}");
        assert_eq!(c["snat_exhausted"], 0);
    }
    let returned: u64 = mux_sockets
        .iter()
        .map(|s| {
            request(s, &json!({"command": "status"})).unwrap()["counters"]["snat_returned"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(
        returned > 0,
        "return traffic went through the muxes' SNAT map"
    );
}
