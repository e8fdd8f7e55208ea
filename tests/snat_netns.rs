//! Egress SNAT (Ananta) in network namespaces (root): every backend opens TCP connections and
//! sends UDP datagrams to an "internet" host at once. They leave with the VIP as source (the
//! agent translates them to a port of its own ranges), the replies come back to the VIP through
//! either mux, which sends each to the owner of its port's range, and the agent translates them
//! back. The internet host sees only the VIP; every port used belongs to the backend that used
//! it. The agents' metrics and `lb status` agree on every counter afterwards.
//!
//! IPv6: plain, unbound sockets (a TCP `connect`, `curl -6`, an unconnected UDP `sendto`) leave
//! with the IPv6 VIP as source too, while the servers' direct-server-return replies to clients
//! inside the egress prefixes are left alone.
//!
//! Exhaustion: a host whose ports are all in use toward a destination refuses the next
//! connection at once (ICMP back into its TUN, so `connect` fails), counted once per connection.

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
use lb_dataplane::agent_run::{AgentCounters, CounterSpec};
use lb_dataplane::socket::request;
use serde_json::{Value, json};

const INTERNET: std::net::Ipv4Addr = Fleet::INTERNET;
const TCP_ECHO: u16 = 7000;
const UDP_ECHO: u16 = 7001;
const CONNECTIONS: usize = 25;

fn fleet_config() -> String {
    web_with_snat(IpAddr::V4(Fleet::VIP), |j| {
        IpAddr::V4(Fleet::backend_address(j))
    })
}

/// VIP `web` (TCP 80, IP-in-IP) on `vip` over the two backends `backend(1)` and `backend(2)`,
/// and the whole port space 1024..=65535 of `vip` for egress SNAT in ranges of 8.
fn web_with_snat(vip: IpAddr, backend: impl Fn(usize) -> IpAddr) -> String {
    let mut s = format!(
        "\n[[vip]]\nname = \"web\"\naddress = \"{vip}\"\nprotocol = \"tcp\"\nport = 80\nencap = \"ipip\"\n"
    );
    for j in 1..=2 {
        s.push_str(&format!(
            "  [[vip.backend]]\n  address = \"{}\"\n",
            backend(j)
        ));
    }
    s.push_str(&format!(
        "\n[[snat]]\naddress = \"{vip}\"\nfirst_port = 1024\nlast_port = 65535\nrange_size = 8\n"
    ));
    s
}

fn start(lab: &mut Lab, ns: &Namespace, what: &str, name: &str, text: &str) -> std::path::PathBuf {
    common::start_node(lab, ns, what, name, text, &["--no-metrics"]).socket
}

/// Where the agents serve their metrics (inside each backend's namespace).
const AGENT_METRICS: &str = "127.0.0.1:9479";

/// The value of one series in a Prometheus text.
fn metric_value(text: &str, spec: &CounterSpec) -> Option<u64> {
    let series = match spec.label {
        None => spec.metric.to_owned(),
        Some((name, value)) => format!("{}{{{name}=\"{value}\"}}", spec.metric),
    };
    text.lines().find_map(|l| {
        let value = l.strip_prefix(&series)?.strip_prefix(' ')?;
        value.trim().parse::<f64>().ok().map(|v| v as u64)
    })
}

/// Waits (up to 10 s) until the agent's metrics show exactly its `lb status` counters, every
/// one of them (the exporter refreshes once a second); fails with the differences otherwise.
fn assert_metrics_match_status(ns: &Namespace, socket: &std::path::Path) -> Value {
    let specs: Vec<CounterSpec> = AgentCounters::default()
        .rows()
        .into_iter()
        .map(|(spec, _)| spec)
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let before = request(socket, &json!({"command": "status"})).unwrap();
        let text = common::metrics_text(ns, AGENT_METRICS);
        let after = request(socket, &json!({"command": "status"})).unwrap();
        let counters = after["counters"].as_object().unwrap();
        assert_eq!(
            counters.len(),
            specs.len(),
            "every status counter has a series: {counters:?}"
        );
        let differences: Vec<String> = specs
            .iter()
            .filter_map(|spec| {
                let status = counters[spec.key].as_u64();
                let metric = metric_value(&text, spec);
                (status != metric)
                    .then(|| format!("{}: status {status:?}, metrics {metric:?}", spec.key))
            })
            .collect();
        if differences.is_empty() && before["counters"] == after["counters"] {
            return after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics and status disagree: {differences:?}\n{text}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A fleet of `muxes` muxes and two backends (with their VIP addresses on lo) and the internet
/// host, in a lab tagged `tag`.
fn snat_fleet(tag: &str, muxes: usize, ipv6: bool) -> (Lab, Fleet, Namespace) {
    let mut lab = Lab::new(tag).unwrap();
    let fleet = Fleet::build(
        &mut lab,
        &FleetPlan {
            muxes,
            backends: 2,
            resilient: false,
            ipv6,
        },
    )
    .unwrap();
    fleet.add_backend_vips().unwrap();
    let internet = fleet.add_internet(&mut lab).unwrap();
    (lab, fleet, internet)
}

#[test]
fn every_backend_reaches_the_internet_with_the_vip_as_source() {
    require_root("snat_netns::every_backend_reaches_the_internet_with_the_vip_as_source");
    let (mut lab, fleet, internet) = snat_fleet("snat", 2, false);
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
        agents.push(
            common::start_node(
                &mut lab,
                &fleet.backends[j - 1],
                "agent",
                &format!("agent{j}"),
                &text,
                &["--metrics", AGENT_METRICS],
            )
            .socket,
        );
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
    internet_servers(
        &internet,
        IpAddr::V4(INTERNET),
        &[TCP_ECHO],
        Arc::clone(&peers),
        Arc::clone(&stop),
    );

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

    // One set of counters: the metrics say what `lb status` says, and both count the
    // translations (25 TCP connections and one UDP socket: 26 mappings per backend). The TUN's
    // own IPv6 router solicitations are no SNAT failures.
    for (j, socket) in agents.iter().enumerate() {
        let s = assert_metrics_match_status(&fleet.backends[j], socket);
        let c = &s["counters"];
        assert_eq!(c["snat_new_mappings"], CONNECTIONS as u64 + 1, "{s}");
        assert!(
            c["snat_outbound"].as_u64().unwrap() >= 4 * CONNECTIONS as u64,
            "{s}"
        );
        assert_eq!(c["snat_outbound_failed"], 0, "{s}");
        assert_eq!(c["kernel_drops"], 0, "{s}");
    }
}

/// A `[[snat]]` space of one range of 8 ports (1024..=1031): one of the two backends owns it,
/// the other has no port at all.
fn tiny_snat_config() -> String {
    fleet_config().replace(
        "first_port = 1024\nlast_port = 65535\nrange_size = 8\n",
        "first_port = 1024\nlast_port = 1031\nrange_size = 8\n",
    )
}

/// Tries a TCP connection from `ns` to the internet host's echo port: `Ok` with the stream, or
/// the error and how long it took to come.
fn try_connect(ns: &Namespace) -> Result<TcpStream, (std::io::Error, Duration)> {
    ns.enter(|| {
        let started = std::time::Instant::now();
        TcpStream::connect_timeout(
            &SocketAddrV4::new(INTERNET, TCP_ECHO).into(),
            Duration::from_secs(5),
        )
        .map_err(|e| (e, started.elapsed()))
    })
    .join()
    .unwrap()
}

#[test]
fn a_host_without_a_free_port_refuses_connections_at_once_and_counts_each_once() {
    require_root(
        "snat_netns::a_host_without_a_free_port_refuses_connections_at_once_and_counts_each_once",
    );
    let (mut lab, fleet, internet) = snat_fleet("snatfull", 1, false);
    let mut agents = Vec::new();
    for j in 1..=2 {
        let text = format!(
            "[node]\nname = \"be{j}\"\ninterface = \"b0\"\naddress_v4 = \"{}\"\ncontrol_socket = SOCKET\n\
             [agent]\nmuxes = [\"{}/32\"]\negress = [\"198.19.0.0/16\"]\n{}",
            Fleet::backend_address(j),
            Fleet::mux_address(1),
            tiny_snat_config()
        );
        agents.push(start(
            &mut lab,
            &fleet.backends[j - 1],
            "agent",
            &format!("agent{j}"),
            &text,
        ));
    }
    start(
        &mut lab,
        &fleet.muxes[0],
        "mux",
        "mux1",
        &format!(
            "[node]\nname = \"mux1\"\ninterface = \"m0\"\naddress_v4 = \"{}\"\nmtu = 1600\ncontrol_socket = SOCKET\n{}",
            Fleet::mux_address(1),
            tiny_snat_config()
        ),
    );
    let peers = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    internet_servers(
        &internet,
        IpAddr::V4(INTERNET),
        &[TCP_ECHO],
        Arc::clone(&peers),
        Arc::clone(&stop),
    );
    let config = Config::from_toml(
        &format!(
            "[node]\naddress_v4 = \"198.18.11.2\"\n{}",
            tiny_snat_config()
        ),
        "t",
    )
    .unwrap();
    let ranges = PortRanges::build(
        &config.snats[0],
        &config.snat_backends(IpAddr::V4(Fleet::VIP)),
    );
    let owner = ranges.owner(1024).expect("one owner");
    let (owner_j, other_j) = if owner == IpAddr::V4(Fleet::backend_address(1)) {
        (1, 2)
    } else {
        (2, 1)
    };
    let exhausted = |j: usize| -> u64 {
        request(&agents[j - 1], &json!({"command": "status"})).unwrap()["counters"]
            ["snat_exhausted"]
            .as_u64()
            .unwrap()
    };

    // The owner: 8 connections to one destination take its 8 ports; the 9th fails at once.
    let mut held = Vec::new();
    for n in 0..8 {
        let mut c = try_connect(&fleet.backends[owner_j - 1])
            .unwrap_or_else(|(e, t)| panic!("connection {n} failed after {t:?}: {e}"));
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        writeln!(c, "hello {n}").unwrap();
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("hello {n}"));
        held.push(c);
    }
    let (error, took) = try_connect(&fleet.backends[owner_j - 1])
        .map(|_| ())
        .expect_err("the ninth connection gets no port");
    assert!(
        took < Duration::from_millis(500),
        "refused at once, not after SYN retries: {error} after {took:?}"
    );
    // The other backend has no port: every connection fails at once, and a UDP flow too.
    for _ in 0..3 {
        let (error, took) = try_connect(&fleet.backends[other_j - 1])
            .map(|_| ())
            .expect_err("no port");
        assert!(took < Duration::from_millis(500), "{error} after {took:?}");
    }
    let udp_error = fleet.backends[other_j - 1]
        .enter(|| {
            let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
            udp.connect(SocketAddrV4::new(INTERNET, UDP_ECHO)).unwrap();
            udp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            for k in 0..3 {
                // After the first refusal, the socket reports the error on the next call.
                let _ = udp.send(format!("udp {k}").as_bytes());
                std::thread::sleep(Duration::from_millis(50));
            }
            let mut buf = [0u8; 64];
            udp.recv(&mut buf).map(|_| ())
        })
        .join()
        .unwrap();
    let udp_error = udp_error.expect_err("the UDP flow is refused");
    assert!(
        !matches!(
            udp_error.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "an error, not silence: {udp_error}"
    );
    // Counted once per connection (the UDP flow once, whatever it sent), and nothing more
    // later: no SYN is retried.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(exhausted(owner_j), 1);
    assert_eq!(exhausted(other_j), 4);
    // The connections that have a port still work.
    for (n, c) in held.iter_mut().enumerate() {
        writeln!(c, "again {n}").unwrap();
        let mut line = String::new();
        BufReader::new(&*c).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), format!("again {n}"));
    }
    stop.store(true, Ordering::Relaxed);
}

/// The internet host's IPv6 address (its link `i0`), and the router's on that link.
const INTERNET6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 2, 0, 0xff, 0, 0, 0, 2);
const INTERNET6_GATEWAY: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0x2001, 2, 0, 0xff, 0, 0, 0, 1);
/// The internet host's "whoami" HTTP port: it answers with the peer's address.
const WHOAMI: u16 = 7080;

/// IPv6 on the internet host's link (a dual-stack fleet's router forwards IPv6).
fn add_internet_v6(fleet: &Fleet, internet: &Namespace) {
    internet
        .ip(&[
            "-6",
            "addr",
            "add",
            &format!("{INTERNET6}/64"),
            "dev",
            "i0",
            "nodad",
        ])
        .unwrap();
    fleet
        .router
        .ip(&[
            "-6",
            "addr",
            "add",
            &format!("{INTERNET6_GATEWAY}/64"),
            "dev",
            "r-i",
            "nodad",
        ])
        .unwrap();
    internet
        .ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &INTERNET6_GATEWAY.to_string(),
        ])
        .unwrap();
}

/// The internet host's servers on `address`, recording their peers: a UDP echo, and on each
/// of `tcp_ports` a TCP echo, or for [`WHOAMI`] an HTTP server answering every request with the
/// peer's address.
fn internet_servers(
    ns: &Namespace,
    address: IpAddr,
    tcp_ports: &[u16],
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for &port in tcp_ports {
        let (peers, stop, ready) = (Arc::clone(&peers), Arc::clone(&stop), ready_tx.clone());
        ns.enter(move || {
            let listener = TcpListener::bind((address, port)).unwrap();
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
                    let mut r = BufReader::new(conn);
                    if port == WHOAMI {
                        let mut line = String::new();
                        while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                            line.clear();
                        }
                        let body = format!("{}\n", peer.ip());
                        let _ = write!(
                            w,
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        return;
                    }
                    for line in r.lines() {
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
        let socket = UdpSocket::bind((address, UDP_ECHO)).unwrap();
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
    for _ in 0..=tcp_ports.len() {
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}

#[test]
fn ipv6_egress_translates_unbound_sockets_and_leaves_direct_server_return_alone() {
    require_root(
        "snat_netns::ipv6_egress_translates_unbound_sockets_and_leaves_direct_server_return_alone",
    );
    let (mut lab, fleet, internet) = snat_fleet("snat6", 2, true);
    add_internet_v6(&fleet, &internet);
    let services = web_with_snat(IpAddr::V6(Fleet::VIP6), |j| {
        IpAddr::V6(Fleet::backend_address_v6(j))
    })
    .replace("name = \"web\"", "name = \"web6\"");
    let muxes = format!(
        "[\"{}/128\", \"{}/128\"]",
        Fleet::mux_address_v6(1),
        Fleet::mux_address_v6(2)
    );
    let mut agents = Vec::new();
    for j in 1..=2 {
        // The egress prefixes hold the internet host *and* the client: the servers' replies to
        // the client (from the VIP) must still leave directly.
        let text = format!(
            "[node]\nname = \"be{j}\"\ninterface = \"b0\"\naddress_v6 = \"{}\"\ncontrol_socket = SOCKET\n\
             [agent]\nmuxes = {muxes}\negress = [\"2001:2:0:ff::/64\", \"2001:2:0:1::/64\"]\n{services}",
            Fleet::backend_address_v6(j),
        );
        agents.push(start(
            &mut lab,
            &fleet.backends[j - 1],
            "agent",
            &format!("agent{j}"),
            &text,
        ));
    }
    for i in 1..=2 {
        let text = format!(
            "[node]\nname = \"mux{i}\"\ninterface = \"m0\"\naddress_v6 = \"{}\"\nmtu = 1600\ncontrol_socket = SOCKET\n{services}",
            Fleet::mux_address_v6(i),
        );
        start(
            &mut lab,
            &fleet.muxes[i - 1],
            "mux",
            &format!("mux{i}"),
            &text,
        );
    }
    let peers = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    internet_servers(
        &internet,
        IpAddr::V6(INTERNET6),
        &[TCP_ECHO, WHOAMI],
        Arc::clone(&peers),
        Arc::clone(&stop),
    );
    for j in 1..=2 {
        common::http_server(
            &fleet.backends[j - 1],
            SocketAddr::new(Fleet::VIP6.into(), 80),
            format!("be{j}\n"),
            Arc::clone(&stop),
        );
    }

    for j in 1..=2 {
        let be = &fleet.backends[j - 1];
        // curl -6, as a user would (no --interface, no bind).
        let out = be
            .exec(
                "curl",
                &[
                    "-6",
                    "-s",
                    "--max-time",
                    "5",
                    &format!("http://[{INTERNET6}]:{WHOAMI}/"),
                ],
            )
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            Fleet::VIP6.to_string(),
            "be{j}: curl -6 left as {:?} ({})",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Unbound TCP connects and an unconnected, unbound UDP socket's send_to.
        let results: Vec<Result<(), String>> = be
            .enter(move || {
                let mut results = Vec::new();
                for n in 0..5 {
                    results.push((|| {
                        let c = TcpStream::connect_timeout(
                            &SocketAddr::new(INTERNET6.into(), TCP_ECHO),
                            Duration::from_secs(5),
                        )
                        .map_err(|e| format!("be{j} connect {n}: {e}"))?;
                        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut w = c.try_clone().unwrap();
                        writeln!(w, "be{j} {n}").map_err(|e| e.to_string())?;
                        let mut line = String::new();
                        BufReader::new(c)
                            .read_line(&mut line)
                            .map_err(|e| format!("be{j} read {n}: {e}"))?;
                        (line.trim() == format!("be{j} {n}"))
                            .then_some(())
                            .ok_or(format!("bad echo {line:?}"))
                    })());
                }
                let udp = UdpSocket::bind("[::]:0").unwrap();
                udp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                for k in 0..3 {
                    let message = format!("udp6 be{j} {k}");
                    udp.send_to(
                        message.as_bytes(),
                        SocketAddr::new(INTERNET6.into(), UDP_ECHO),
                    )
                    .unwrap();
                    let mut buf = [0u8; 256];
                    results.push(match udp.recv_from(&mut buf) {
                        Ok((n, from)) if &buf[..n] == message.as_bytes() => (from
                            == SocketAddr::new(INTERNET6.into(), UDP_ECHO))
                        .then_some(())
                        .ok_or(format!("echo from {from}")),
                        Ok((n, _)) => Err(format!("bad UDP echo {:?}", &buf[..n])),
                        Err(e) => Err(format!("be{j} UDP {k}: {e}")),
                    });
                }
                results
            })
            .join()
            .unwrap();
        let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failures.is_empty(),
            "{failures:?}\n{}",
            request(&agents[j - 1], &json!({"command": "status"})).unwrap()
        );
    }
    // Direct server return to a client inside the egress prefixes still works.
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let who = common::http_get(&fleet.client, SocketAddr::new(Fleet::VIP6.into(), 80))
            .expect("a request from the client to the IPv6 VIP");
        answered.insert(who);
    }
    assert_eq!(answered.len(), 2, "{answered:?}");
    stop.store(true, Ordering::Relaxed);

    let peers = peers.lock().unwrap().clone();
    assert_eq!(peers.len(), 2 * (1 + 5 + 3), "{peers:?}");
    let config = Config::from_toml(
        &format!(
            "[node]\naddress_v6 = \"{}\"\n{services}",
            Fleet::mux_address_v6(1)
        ),
        "t",
    )
    .unwrap();
    let ranges = PortRanges::build(
        &config.snats[0],
        &config.snat_backends(IpAddr::V6(Fleet::VIP6)),
    );
    for peer in &peers {
        assert_eq!(
            peer.ip(),
            IpAddr::V6(Fleet::VIP6),
            "the internet saw {peer}"
        );
        assert!(ranges.owner(peer.port()).is_some(), "{peer}");
    }
    for socket in &agents {
        let s = request(socket, &json!({"command": "status"})).unwrap();
        let c = &s["counters"];
        assert!(c["snat_outbound"].as_u64().unwrap() > 0, "{s}");
        assert!(c["snat_inbound"].as_u64().unwrap() > 0, "{s}");
        assert_eq!(c["snat_outbound_failed"], 0, "{s}");
        assert_eq!(c["tun_errors"], 0, "{s}");
    }
}
