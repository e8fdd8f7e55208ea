//! `lb mux` on real interfaces, in network namespaces (root): a client, a router with an ECMP
//! route for the VIP over two muxes, two backends that capture and decode (with etherparse) what
//! the muxes send them.
//!
//! - Every flow reaches a backend; a flow reaches the same backend through either mux (the
//!   muxes build the same tables); IP-in-IP and GRE both decode; fingerprints agree.
//! - 100 reloads under a steady sequenced UDP stream lose and reorder nothing; a bad config
//!   pushed mid-stream is rejected and loses nothing.
//! - The config rewritten in place one line at a time under that stream loses nothing and
//!   publishes nothing; a FIFO at the config path blocks neither status, reload nor SIGTERM.
//! - Bad frames on the wire are counted and dropped, each under its reason (the golden table's
//!   frames for the parser's strictness among them), and the node keeps forwarding.
//! - SIGTERM stops the node with exit code 0 and removes its control socket.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Captured, EncapCapture};
use lb::netns::{Lab, Namespace, require_root};
use lb::topology::{Fleet, FleetPlan};
use lb_core::forward::{Action, DropReason};
use lb_core::packet::Link;
use lb_dataplane::socket::request;
use serde_json::{Value, json};

const WEB: u16 = 80;
const ECHO: u16 = 7;
const DNS: u16 = 53;

fn backends_toml(weights: &[u32]) -> String {
    let mut s = String::new();
    for (j, w) in weights.iter().enumerate() {
        s.push_str(&format!(
            "  [[vip.backend]]\n  address = \"{}\"\n  weight = {w}\n  name = \"be{}\"\n",
            Fleet::backend_address(j + 1),
            j + 1
        ));
    }
    s
}

/// The config of mux `i`: VIP web (TCP 80, IP-in-IP), echo (UDP 7, GRE), dns (UDP 53,
/// IP-in-IP), each over the backends with `weights`.
fn mux_config(i: usize, socket: &Path, weights: &[u32]) -> String {
    let mut s = format!(
        "[node]\nname = \"mux{i}\"\ninterface = \"m0\"\naddress_v4 = \"{}\"\nworkers = 2\nmtu = 1600\n\
         control_socket = {socket:?}\nmetrics_address = \"127.0.0.1:9477\"\n",
        Fleet::mux_address(i)
    );
    for (name, proto, port, encap) in [
        ("web", "tcp", WEB, "ipip"),
        ("echo", "udp", ECHO, "gre"),
        ("dns", "udp", DNS, "ipip"),
    ] {
        s.push_str(&format!(
            "\n[[vip]]\nname = \"{name}\"\naddress = \"{}\"\nprotocol = \"{proto}\"\nport = {port}\nencap = \"{encap}\"\n",
            Fleet::VIP
        ));
        s.push_str(&backends_toml(weights));
    }
    s
}

struct RunningMux {
    pid: u32,
    socket: PathBuf,
    config: PathBuf,
}

fn start_mux(lab: &mut Lab, ns: &Namespace, i: usize, weights: &[u32]) -> RunningMux {
    let socket = lab.log_dir().join(format!("mux{i}.sock"));
    let node = common::start_node(
        lab,
        ns,
        "mux",
        &format!("mux{i}"),
        &mux_config(i, &socket, weights),
        &[],
    );
    RunningMux {
        pid: node.pid,
        socket: node.socket,
        config: node.config,
    }
}

fn status(mux: &RunningMux) -> Value {
    let s = request(&mux.socket, &json!({"command": "status"})).unwrap();
    assert_eq!(s["ok"], true, "{s}");
    s
}

/// Sends `packets` datagrams per flow from the client, flow `f` from source port
/// `first_port + f`, to the VIP's `port`; the payload is (port, flow, sequence).
fn send_udp(client: &Namespace, port: u16, first_port: u16, flows: u16, seq: std::ops::Range<u32>) {
    client
        .enter(move || {
            let sockets: Vec<UdpSocket> = (0..flows)
                .map(|f| UdpSocket::bind(SocketAddrV4::new(Fleet::CLIENT, first_port + f)).unwrap())
                .collect();
            for s in seq {
                for (f, socket) in sockets.iter().enumerate() {
                    let mut payload = port.to_be_bytes().to_vec();
                    payload.extend_from_slice(&(f as u32).to_be_bytes());
                    payload.extend_from_slice(&s.to_be_bytes());
                    socket
                        .send_to(&payload, SocketAddrV4::new(Fleet::VIP, port))
                        .unwrap();
                }
                // Bounded and gentle: the point is correctness, not rate.
                std::thread::sleep(Duration::from_micros(200));
            }
        })
        .join()
        .unwrap();
}

/// (VIP port, source port) → (backends seen, muxes seen, encapsulation protocols seen).
type FlowMap = BTreeMap<(u16, u16), (BTreeSet<Ipv4Addr>, BTreeSet<Ipv4Addr>, BTreeSet<u8>)>;

fn flows_of(captured: &[Captured]) -> FlowMap {
    let mut map = FlowMap::new();
    for c in captured {
        assert!(c.outer_checksum_ok, "outer checksum wrong: {c:?}");
        let inner = c.inner.as_ref().expect("inner packet decodes");
        assert_eq!(inner.dst, std::net::IpAddr::V4(Fleet::VIP));
        let (Some(sport), Some(dport)) = (inner.src_port, inner.dst_port) else {
            panic!("no ports: {c:?}")
        };
        let e = map.entry((dport, sport)).or_default();
        e.0.insert(c.outer_dst);
        e.1.insert(c.outer_src);
        e.2.insert(c.outer_protocol);
    }
    map
}

fn capture_all(fleet: &Fleet) -> Vec<EncapCapture> {
    fleet.backends.iter().map(EncapCapture::start).collect()
}

fn stop_all(captures: Vec<EncapCapture>) -> Vec<Captured> {
    captures.into_iter().flat_map(EncapCapture::stop).collect()
}

/// A SYN for the web VIP from each of `n` connection attempts (no server answers).
fn tcp_syns(client: &Namespace, n: usize) {
    client
        .enter(move || {
            let threads: Vec<_> = (0..n)
                .map(|_| {
                    std::thread::spawn(|| {
                        let _ = TcpStream::connect_timeout(
                            &SocketAddrV4::new(Fleet::VIP, WEB).into(),
                            Duration::from_millis(300),
                        );
                    })
                })
                .collect();
            for t in threads {
                let _ = t.join();
            }
        })
        .join()
        .unwrap();
}

#[test]
fn every_flow_reaches_the_same_backend_through_either_mux_in_both_encaps() {
    require_root(
        "mux_netns::every_flow_reaches_the_same_backend_through_either_mux_in_both_encaps",
    );
    let mut lab = Lab::new("muxecmp").unwrap();
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
    let muxes: Vec<RunningMux> = (1..=2)
        .map(|i| start_mux(&mut lab, &fleet.muxes[i - 1], i, &[1, 1]))
        .collect();
    let flows = 40u16;
    let mut phases: Vec<FlowMap> = Vec::new();
    for (phase, route) in [&[1][..], &[2], &[1, 2]].iter().enumerate() {
        fleet.route_vip_via(route).unwrap();
        let captures = capture_all(&fleet);
        send_udp(&fleet.client, ECHO, 20_000, flows, 0..3);
        send_udp(&fleet.client, DNS, 20_000, flows, 0..3);
        if phase == 0 {
            tcp_syns(&fleet.client, 16);
        }
        let expected = usize::from(flows) * 3 * 2;
        let deadline = Instant::now() + Duration::from_secs(10);
        while captures.iter().map(|c| c.packets().len()).sum::<usize>() < expected
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(300));
        let captured = stop_all(captures);
        let udp: Vec<Captured> = captured
            .iter()
            .filter(|c| c.inner.as_ref().is_ok_and(|i| i.protocol == 17))
            .cloned()
            .collect();
        assert_eq!(
            udp.len(),
            expected,
            "phase {phase}: every datagram arrives exactly once"
        );
        for c in &udp {
            let inner = c.inner.as_ref().unwrap();
            match inner.dst_port {
                Some(ECHO) => {
                    assert_eq!(c.outer_protocol, 47, "echo is GRE");
                    let gre = c.gre.as_ref().unwrap();
                    assert_eq!((gre.protocol, gre.key), (0x0800, None));
                }
                Some(DNS) => assert_eq!(c.outer_protocol, 4, "dns is IP-in-IP"),
                other => panic!("unexpected port {other:?}"),
            }
            assert_eq!(inner.payload[..2], inner.dst_port.unwrap().to_be_bytes());
        }
        if phase == 0 {
            let syns: Vec<&Captured> = captured
                .iter()
                .filter(|c| c.inner.as_ref().is_ok_and(|i| i.protocol == 6))
                .collect();
            assert!(syns.len() >= 16, "every SYN arrives: {}", syns.len());
            assert!(
                syns.iter().all(|c| c.outer_protocol == 4),
                "web is IP-in-IP"
            );
        }
        let map = flows_of(&udp);
        for ((port, sport), (backends, via, _)) in &map {
            assert_eq!(
                backends.len(),
                1,
                "flow {port}/{sport} split over {backends:?}"
            );
            if route.len() == 1 {
                assert_eq!(
                    via.iter().copied().collect::<Vec<_>>(),
                    vec![Fleet::mux_address(route[0])],
                    "phase {phase}: the outer source is the mux in use"
                );
            }
        }
        phases.push(map);
    }
    // Same flow, same backend, whichever mux carried it.
    for (key, (backends, _, _)) in &phases[0] {
        for (phase, map) in phases.iter().enumerate().skip(1) {
            assert_eq!(&map[key].0, backends, "flow {key:?} moved in phase {phase}");
        }
    }
    let used: BTreeSet<Ipv4Addr> = phases[0].values().flat_map(|v| v.0.clone()).collect();
    assert_eq!(used.len(), 2, "80 flows use both backends");
    let via_both: BTreeSet<Ipv4Addr> = phases[2].values().flat_map(|v| v.1.clone()).collect();
    assert_eq!(via_both.len(), 2, "ECMP spreads flows over both muxes");

    // Both muxes built the same tables; status and metrics say so.
    let (s1, s2) = (status(&muxes[0]), status(&muxes[1]));
    for v in 0..3 {
        assert_eq!(s1["vips"][v]["fingerprint"], s2["vips"][v]["fingerprint"]);
    }
    assert_eq!(s1["counters"]["drops"]["internal"], 0);
    let workers = s1["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    let metrics = common::metrics_text(&fleet.muxes[0], "127.0.0.1:9477");
    assert!(metrics.contains("lb_backend_packets_total{"), "{metrics}");
    assert!(metrics.contains(&format!(
        "fingerprint=\"{}\"",
        s1["vips"][0]["fingerprint"].as_str().unwrap()
    )));
    assert!(metrics.contains("lb_drops_total{reason=\"internal\"} 0"));

    // The operator's commands: lb status (text and JSON) and lb ctl.
    let lb = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_lb"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lb {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let socket = muxes[0].socket.to_str().unwrap();
    let text = lb(&["status", "--socket", socket]);
    assert!(
        text.contains("node mux1") && text.contains("fingerprint 0x"),
        "{text}"
    );
    let json_status: Value =
        serde_json::from_str(&lb(&["status", "--socket", socket, "--json"])).unwrap();
    assert_eq!(
        json_status["vips"][0]["fingerprint"],
        s1["vips"][0]["fingerprint"]
    );
    let be1 = Fleet::backend_address(1).to_string();
    lb(&["ctl", "--socket", socket, "drain", &be1, "--vip", "web"]);
    assert_eq!(status(&muxes[0])["vips"][0]["backends"][0]["drained"], true);
    lb(&["ctl", "--socket", socket, "undrain", &be1]);
    assert_eq!(
        status(&muxes[0])["vips"][0]["backends"][0]["drained"],
        false
    );
    let refused = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["ctl", "--socket", socket, "drain", "198.18.99.99"])
        .output()
        .unwrap();
    assert_eq!(
        refused.status.code(),
        Some(1),
        "an unknown backend is refused"
    );

    // SIGTERM: exit 0, socket removed.
    for m in &muxes {
        lab.signal(m.pid, libc::SIGTERM).unwrap();
        let exit = lab.wait(m.pid, Duration::from_secs(10));
        assert!(
            exit.is_some_and(|s| s.success()),
            "{exit:?}\n{}",
            lab.log(m.pid)
        );
        assert!(!m.socket.exists());
    }
}

/// A fleet of one mux (weights 1, 1) and two backends, in a lab tagged `tag`.
fn one_mux_fleet(tag: &str) -> (Lab, Fleet, RunningMux) {
    let mut lab = Lab::new(tag).unwrap();
    let fleet = Fleet::build(
        &mut lab,
        &FleetPlan {
            muxes: 1,
            backends: 2,
            resilient: false,
            ipv6: false,
        },
    )
    .unwrap();
    let mux = start_mux(&mut lab, &fleet.muxes[0], 1, &[1, 1]);
    (lab, fleet, mux)
}

/// Sends `packets` sequenced datagrams (4-byte big-endian sequence numbers) from the client's
/// port `sport` to the VIP's echo port, 1000 a second.
fn sequenced_udp(client: &Namespace, sport: u16, packets: u32) -> std::thread::JoinHandle<()> {
    let client = client.clone();
    std::thread::spawn(move || {
        client
            .enter(move || {
                let socket = UdpSocket::bind(SocketAddrV4::new(Fleet::CLIENT, sport)).unwrap();
                let start = Instant::now();
                for seq in 0..packets {
                    let due = start + Duration::from_micros(u64::from(seq) * 1000);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    socket
                        .send_to(&seq.to_be_bytes(), SocketAddrV4::new(Fleet::VIP, ECHO))
                        .unwrap();
                }
            })
            .join()
            .unwrap();
    })
}

/// The flow from `sport` reached one backend with every sequence number, in order.
fn assert_sequence_intact(captured: &[Captured], sport: u16, packets: u32, mux: &RunningMux) {
    let seqs: Vec<(Ipv4Addr, u32)> = captured
        .iter()
        .filter_map(|c| {
            let inner = c.inner.as_ref().ok()?;
            (inner.src_port == Some(sport)).then(|| {
                (
                    c.outer_dst,
                    u32::from_be_bytes(inner.payload[..4].try_into().unwrap()),
                )
            })
        })
        .collect();
    let backends: BTreeSet<Ipv4Addr> = seqs.iter().map(|s| s.0).collect();
    assert_eq!(backends.len(), 1, "the flow kept its backend: {backends:?}");
    let got: Vec<u32> = seqs.iter().map(|s| s.1).collect();
    let lost = packets as usize - got.len();
    assert_eq!(
        lost,
        0,
        "lost {lost} of {packets}; the mux's counters: {}",
        status(mux)["counters"]
    );
    assert!(got.windows(2).all(|w| w[0] < w[1]), "reordered");
    assert_eq!(got, (0..packets).collect::<Vec<_>>());
}

#[test]
fn a_config_rewritten_slowly_under_load_loses_nothing_and_a_fifo_wedges_nothing() {
    require_root(
        "mux_netns::a_config_rewritten_slowly_under_load_loses_nothing_and_a_fifo_wedges_nothing",
    );
    let (mut lab, fleet, mux) = one_mux_fleet("muxslow");
    let text = std::fs::read_to_string(&mux.config).unwrap();
    let captures = capture_all(&fleet);
    const PACKETS: u32 = 4000;
    let sender = sequenced_udp(&fleet.client, 31_001, PACKETS);
    std::thread::sleep(Duration::from_millis(200));
    // The same contents written back one line every 120 ms (a slow `cat >`, scp): every prefix
    // is a valid config with fewer VIPs or backends.
    {
        use std::io::Write as _;
        let mut file = std::fs::File::create(&mux.config).unwrap();
        for line in text.split_inclusive('\n') {
            file.write_all(line.as_bytes()).unwrap();
            file.flush().unwrap();
            std::thread::sleep(Duration::from_millis(120));
        }
    }
    sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_sequence_intact(&stop_all(captures), 31_001, PACKETS, &mux);
    let s = status(&mux);
    assert_eq!(
        s["generation"], 1,
        "the same contents were published again: {s}"
    );

    // What an operator must not miss is logged at WARN: a VIP left with no healthy backend,
    // and every VIP and backend a reload removes.
    for backend in [Fleet::backend_address(1), Fleet::backend_address(2)] {
        let answer = request(
            &mux.socket,
            &json!({"command": "set-health", "backend": backend.to_string(), "vip": "dns", "healthy": false}),
        )
        .unwrap();
        assert_eq!(answer["ok"], true, "{answer}");
    }
    let dns = status(&mux)["vips"][2].clone();
    assert_eq!(dns["state"], "no_healthy_backend", "{dns}");
    let fewer = mux_config(1, &mux.socket, &[1]);
    let fewer = &fewer[..fewer.find("name = \"dns\"").unwrap() - "\n[[vip]]\n".len()];
    std::fs::write(&mux.config, fewer).unwrap();
    let answer = request(&mux.socket, &json!({"command": "reload"})).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    let log = lab.log(mux.pid);
    let warned = |words: &[&str]| {
        log.lines()
            .any(|l| l.contains("WARN") && words.iter().all(|w| l.contains(w)))
    };
    assert!(warned(&["no healthy backend", "dns"]), "{log}");
    assert!(warned(&["VIP removed by the new config", "dns"]), "{log}");
    assert!(
        warned(&["backend removed by the new config", "198.18.22.2"]),
        "{log}"
    );

    // A FIFO at the config path: the watcher refuses it without blocking, status and an
    // explicit reload answer at once, SIGTERM stops the node.
    std::fs::remove_file(&mux.config).unwrap();
    let made = Command::new("mkfifo").arg(&mux.config).status().unwrap();
    assert!(made.success());
    std::thread::sleep(Duration::from_millis(800));
    let started = Instant::now();
    let answer = request(&mux.socket, &json!({"command": "reload"})).unwrap();
    assert_eq!(answer["ok"], false);
    assert!(
        answer["error"].as_str().unwrap().contains("FIFO"),
        "{answer}"
    );
    assert_eq!(status(&mux)["vips"].as_array().unwrap().len(), 2);
    assert!(started.elapsed() < Duration::from_secs(2));
    lab.signal(mux.pid, libc::SIGTERM).unwrap();
    let exit = lab.wait(mux.pid, Duration::from_secs(3));
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}\n{}",
        lab.log(mux.pid)
    );
}

#[test]
fn a_hundred_reloads_under_load_lose_and_reorder_nothing() {
    require_root("mux_netns::a_hundred_reloads_under_load_lose_and_reorder_nothing");
    let (lab, fleet, mux) = one_mux_fleet("muxreload");
    let config_a = mux_config(1, &mux.socket, &[1, 1]);
    let config_b = mux_config(1, &mux.socket, &[1, 3]);
    let captures = capture_all(&fleet);
    // One flow, 1000 packets a second for about 5 s, while the config changes 100 times.
    const PACKETS: u32 = 5000;
    let sender = sequenced_udp(&fleet.client, 31_000, PACKETS);
    std::thread::sleep(Duration::from_millis(200));
    let mut reloads = 0;
    for n in 0..100 {
        std::fs::write(&mux.config, if n % 2 == 0 { &config_b } else { &config_a }).unwrap();
        if n % 2 == 0 {
            let answer = request(&mux.socket, &json!({"command": "reload"})).unwrap();
            assert_eq!(answer["ok"], true, "{answer}");
        } else {
            lab.signal(mux.pid, libc::SIGHUP).unwrap();
        }
        reloads += 1;
        std::thread::sleep(Duration::from_millis(25));
        if n == 50 {
            // A bad config mid-stream: rejected, the field named, nothing lost.
            std::fs::write(&mux.config, config_a.replace("mtu = 1600", "mtu = 100")).unwrap();
            let answer = request(&mux.socket, &json!({"command": "reload"})).unwrap();
            assert_eq!(answer["ok"], false);
            assert!(
                answer["error"].as_str().unwrap().contains("node.mtu"),
                "{answer}"
            );
        }
    }
    sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_sequence_intact(&stop_all(captures), 31_000, PACKETS, &mux);
    let s = status(&mux);
    assert!(s["reloads"]["ok"].as_u64().unwrap() >= reloads, "{s}");
    assert!(s["reloads"]["failed"].as_u64().unwrap() >= 1);
    let generation = s["generation"].as_u64().unwrap();
    assert!(generation > 100);

    // The file watcher: a changed file is picked up with no signal and no command.
    std::fs::write(&mux.config, mux_config(1, &mux.socket, &[2, 1])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(&mux)["generation"].as_u64().unwrap() == generation {
        assert!(
            Instant::now() < deadline,
            "the changed file was not reloaded"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status(&mux)["vips"][0]["backends"][0]["weight"], 2);
}

#[test]
fn bad_frames_on_the_wire_are_counted_and_dropped() {
    require_root("mux_netns::bad_frames_on_the_wire_are_counted_and_dropped");
    let mut lab = Lab::new("muxwire").unwrap();
    let fleet = Fleet::build(
        &mut lab,
        &FleetPlan {
            muxes: 1,
            backends: 1,
            resilient: false,
            ipv6: false,
        },
    )
    .unwrap();
    let mux = start_mux(&mut lab, &fleet.muxes[0], 1, &[1]);
    let mux_mac = fleet.muxes[0].mac("m0").unwrap();
    let router_mac = fleet.router.mac("r-m1").unwrap();
    let good = udp_frame(mux_mac, router_mac, 17, 40_000);
    let mut bad_checksum = good.clone();
    bad_checksum[24] ^= 0xff;
    let mut bad_version = good.clone();
    bad_version[14] = 0x55;
    let truncated = good[..30].to_vec();
    let mut bad_length = good.clone();
    bad_length[16] = 0xff;
    // Only the length is wrong: the header checksum matches it.
    bad_length[24..26].fill(0);
    let sum = common::internet_checksum(&bad_length[14..34]);
    bad_length[24..26].copy_from_slice(&sum.to_be_bytes());
    let unknown_protocol = udp_frame(mux_mac, router_mac, 200, 40_000);
    let before = status(&mux);
    // On AF_XDP the steering program hands the mux only frames addressed to a VIP (IPv4 or
    // IPv6 by EtherType, long enough to hold the destination); the others are the kernel's
    // and never reach the mux's counters.
    let xdp = before["io"]["mode"] == "af_xdp";
    let reaches_mux = |f: &[u8]| u64::from(!xdp || common::steered_to_vip(f, Fleet::VIP.into()));
    let hundreds = |fs: &[&Vec<u8>]| 100 * fs.iter().map(|f| reaches_mux(f)).sum::<u64>();
    let expected_bad_checksum = hundreds(&[&bad_checksum]);
    let expected_bad_shapes = hundreds(&[&bad_version, &truncated, &bad_length]);
    let expected_passed = hundreds(&[&unknown_protocol]);
    let mut frames = vec![
        bad_checksum,
        bad_version,
        truncated,
        bad_length,
        unknown_protocol,
    ];
    // The golden table's frames for the parser's strictness (issue 12, item 7) that concern
    // this mux's IPv4 VIPs: wrong version for the EtherType, bad IPv4 options, UDP lengths that
    // are not the payload's, martian sources, TTL 0. Each was forwarded before.
    let strict: Vec<(DropReason, Vec<u8>)> = lb_core::golden::table()
        .into_iter()
        .filter_map(|g| {
            let Action::Drop(reason) = g.expected else {
                return None;
            };
            let new_reason = matches!(
                reason,
                DropReason::VersionMismatch
                    | DropReason::BadIpOptions
                    | DropReason::MartianSource
                    | DropReason::TtlExpired
            );
            if !new_reason && !g.description.starts_with("UDP length") {
                return None;
            }
            let (ethertype, ip) = match g.link {
                Link::Ethernet => ([g.input[12], g.input[13]], &g.input[14..]),
                Link::Ip => ([0x08, 0x00], &g.input[..]),
            };
            let to_vip = ip[0] >> 4 == 4 && ip[16..20] == Fleet::VIP.octets();
            if reason != DropReason::VersionMismatch && !to_vip {
                return None; // IPv6, or SNAT traffic: this mux has neither
            }
            let mut frame = mux_mac.to_vec();
            frame.extend_from_slice(&router_mac);
            frame.extend_from_slice(&ethertype);
            frame.extend_from_slice(ip);
            Some((reason, frame))
        })
        .collect();
    assert!(strict.len() >= 10, "{}", strict.len());
    frames.extend(strict.iter().map(|(_, f)| f.clone()));
    let total = frames.len() as u64 * 100;
    let reaching: u64 = 100 * frames.iter().map(|f| reaches_mux(f)).sum::<u64>();
    fleet
        .router
        .enter(move || lb::blast::blast("r-m1", &frames, Duration::from_secs(5), total))
        .join()
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let s = status(&mux);
        let frames = s["counters"]["frames"].as_u64().unwrap()
            - before["counters"]["frames"].as_u64().unwrap();
        if frames >= reaching || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let delta = |path: &[&str]| {
        let get = |v: &Value| {
            path.iter()
                .fold(v.clone(), |v, k| v[*k].clone())
                .as_u64()
                .unwrap()
        };
        get(&after) - get(&before)
    };
    assert_eq!(
        delta(&["counters", "drops", "bad_checksum"]),
        expected_bad_checksum,
        "{after:#}"
    );
    let strict_of = |reasons: &[DropReason]| {
        100 * strict
            .iter()
            .filter(|(r, f)| reasons.contains(r) && reaches_mux(f) == 1)
            .count() as u64
    };
    assert_eq!(
        delta(&["counters", "drops", "malformed"]) + delta(&["counters", "drops", "truncated"]),
        expected_bad_shapes + strict_of(&[DropReason::Malformed, DropReason::Truncated]),
        "{after:#}"
    );
    for reason in [
        DropReason::VersionMismatch,
        DropReason::BadIpOptions,
        DropReason::MartianSource,
        DropReason::TtlExpired,
    ] {
        assert!(
            strict.iter().any(|(r, _)| *r == reason),
            "a frame for {}",
            reason.name()
        );
        assert_eq!(
            delta(&["counters", "drops", reason.name()]),
            strict_of(&[reason]),
            "{after:#}"
        );
    }
    assert_eq!(
        delta(&["counters", "encapsulated"]),
        0,
        "nothing of it was forwarded"
    );
    // A protocol no VIP serves is not ours: passed to the host (node.unmatched = "pass").
    // The link's own chatter (ARP, IPv6 neighbour discovery) is passed too, so allow a little.
    let passed = delta(&["counters", "passed"]);
    assert!(
        (expected_passed..expected_passed + 10).contains(&passed),
        "passed {passed}"
    );
    assert_eq!(
        reaching,
        {
            let c = |k: &str| delta(&["counters", k]);
            c("frames")
        } - (passed - expected_passed),
        "every frame that reaches the mux is counted once"
    );
    assert_eq!(after["counters"]["drops"]["internal"], 0);
    // And the node still forwards.
    let capture = EncapCapture::start(&fleet.backends[0]);
    send_udp(&fleet.client, ECHO, 41_000, 1, 0..10);
    assert_eq!(capture.wait_for(10, Duration::from_secs(5)).len(), 10);
    assert!(
        lab.wait(mux.pid, Duration::ZERO).is_none(),
        "the node is alive"
    );
}

/// An Ethernet/IPv4 frame from the router to the VIP with `protocol` and a UDP-like header.
fn udp_frame(dst: [u8; 6], src: [u8; 6], protocol: u8, sport: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(src, dst)
        .ipv4(Fleet::CLIENT.octets(), Fleet::VIP.octets(), 64)
        .udp(sport, ECHO);
    let mut f = Vec::new();
    b.write(&mut f, &[1, 2, 3, 4]).unwrap();
    f[23] = protocol;
    // Recompute the IPv4 header checksum for the changed protocol.
    f[24..26].fill(0);
    let sum = common::internet_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    f
}
