//! `lb mux` on AF_XDP in network namespaces (root), the way an operator runs it:
//!
//! - A mux killed with SIGKILL leaves no XDP program behind (the BPF link dies with the
//!   process); started again it attaches and forwards at once (the time is printed).
//! - While it runs, the host's own traffic works: ARP and ping to the mux's address, and a
//!   TCP connection to it (what BGP needs; `bgp_netns` runs real BIRD with the lab's muxes on
//!   AF_XDP).
//! - Someone else's XDP program on the interface is never replaced: `io = "af_xdp"` refuses to
//!   start and says why, `io = "auto"` falls back to AF_PACKET (shown in status) and forwards,
//!   and the other program is still attached afterwards.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::EncapCapture;
use lb::netns::{Lab, Namespace, require_root};
use lb::topology::{Fleet, FleetPlan};
use lb_dataplane::socket::request;
use serde_json::{Value, json};

const ECHO: u16 = 7;

fn config(io: &str) -> String {
    format!(
        "[node]\nname = \"mux1\"\ninterface = \"m0\"\naddress_v4 = \"{}\"\nworkers = 2\nmtu = 1600\n\
         io = \"{io}\"\ncontrol_socket = SOCKET\n\n\
         [[vip]]\nname = \"echo\"\naddress = \"{}\"\nprotocol = \"udp\"\nport = {ECHO}\nencap = \"gre\"\n\
         [[vip.backend]]\naddress = \"{}\"\n",
        Fleet::mux_address(1),
        Fleet::VIP,
        Fleet::backend_address(1),
    )
}

fn fleet(lab: &mut Lab) -> Fleet {
    let fleet = Fleet::build(
        lab,
        &FleetPlan {
            muxes: 1,
            backends: 1,
            resilient: false,
            ipv6: false,
        },
    )
    .unwrap();
    fleet.route_vip_via(&[1]).unwrap();
    fleet
}

fn status(socket: &std::path::Path) -> Value {
    let s = request(socket, &json!({"command": "status"})).unwrap();
    assert_eq!(s["ok"], true, "{s}");
    s
}

/// One datagram from the client to the echo VIP from source port `port`.
fn send_one(client: &Namespace, port: u16) {
    client
        .enter(move || {
            let s = UdpSocket::bind(SocketAddrV4::new(Fleet::CLIENT, port)).unwrap();
            s.send_to(b"xdp", SocketAddrV4::new(Fleet::VIP, ECHO))
                .unwrap();
        })
        .join()
        .unwrap();
}

/// Sends datagrams (one every 10 ms, at most `within`) until `capture` holds `count` more
/// than `before`; how long that took, or None.
fn forwarded_within(
    fleet: &Fleet,
    capture: &EncapCapture,
    before: usize,
    within: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let mut port = 42_000;
    while start.elapsed() < within {
        send_one(&fleet.client, port);
        port += 1;
        std::thread::sleep(Duration::from_millis(10));
        if capture.packets().len() > before {
            return Some(start.elapsed());
        }
    }
    None
}

fn xdp_attached(mux: &Namespace) -> bool {
    // `ip link` prints `prog/xdp id N ...` for an attached program (the lab's namespace names
    // contain "xdp" too, hence the whole token).
    mux.ip(&["link", "show", "m0"])
        .unwrap()
        .contains("prog/xdp")
}

#[test]
fn a_sigkilled_af_xdp_mux_restarts_attached_and_the_host_keeps_its_own_traffic() {
    require_root(
        "xdp_netns::a_sigkilled_af_xdp_mux_restarts_attached_and_the_host_keeps_its_own_traffic",
    );
    let mut lab = Lab::new("xdpkill").unwrap();
    let fleet = fleet(&mut lab);
    let mux_ns = &fleet.muxes[0];
    let mux = common::start_node(
        &mut lab,
        mux_ns,
        "mux",
        "mux1",
        &config("af_xdp"),
        &["--no-metrics"],
    );
    let s = status(&mux.socket);
    assert_eq!(s["io"]["mode"], "af_xdp", "{s:#}");
    assert_eq!(s["io"]["attach"], "driver", "veth has native XDP: {s:#}");
    assert_eq!(s["io"]["bind"], "copy", "veth has no zero-copy: {s:#}");
    assert_eq!(
        s["io"]["queues"], 2,
        "one socket per queue of the lab's veth: {s:#}"
    );
    assert!(xdp_attached(mux_ns));

    // The host's own traffic while the program is attached: ARP (the router forgets the mux's
    // MAC first), ping, and TCP to the mux's own address.
    let mux_ip = Fleet::mux_address(1).to_string();
    fleet.router.ip(&["neigh", "flush", "dev", "r-m1"]).unwrap();
    let ping = fleet
        .router
        .exec("ping", &["-c", "3", "-i", "0.2", "-W", "1", &mux_ip])
        .unwrap();
    assert!(
        ping.status.success(),
        "ping the mux: {}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let neigh = fleet.router.ip(&["neigh", "show", "dev", "r-m1"]).unwrap();
    assert!(neigh.contains(&mux_ip), "ARP resolved the mux: {neigh}");
    let at = SocketAddrV4::new(Fleet::mux_address(1), 179);
    let server = mux_ns.enter(move || {
        let l = TcpListener::bind(at).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let mut line = String::new();
        BufReader::new(c.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        c.write_all(line.as_bytes()).unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    let echoed = fleet
        .router
        .enter(move || {
            let mut c = TcpStream::connect_timeout(&at.into(), Duration::from_secs(2)).unwrap();
            c.write_all(b"OPEN\n").unwrap();
            let mut line = String::new();
            BufReader::new(c).read_line(&mut line).unwrap();
            line
        })
        .join()
        .unwrap();
    server.join().unwrap();
    assert_eq!(echoed, "OPEN\n", "TCP to the mux's own address");

    // VIP traffic is forwarded.
    let capture = EncapCapture::start(&fleet.backends[0]);
    assert!(forwarded_within(&fleet, &capture, 0, Duration::from_secs(5)).is_some());
    let deadline = Instant::now() + Duration::from_secs(2);
    while status(&mux.socket)["counters"]["encapsulated"] == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_ne!(status(&mux.socket)["counters"]["encapsulated"], 0);

    // SIGKILL: no cleanup code runs, yet the program goes with the process.
    lab.signal(mux.pid, libc::SIGKILL).unwrap();
    assert!(lab.wait(mux.pid, Duration::from_secs(5)).is_some());
    let deadline = Instant::now() + Duration::from_secs(2);
    while xdp_attached(mux_ns) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!xdp_attached(mux_ns), "the BPF link died with the mux");

    let started = Instant::now();
    let again = common::restart_node(&mut lab, mux_ns, "mux", "mux1", &mux, &["--no-metrics"]);
    let answering = started.elapsed();
    let before = capture.packets().len();
    let forwarding = forwarded_within(&fleet, &capture, before, Duration::from_secs(5))
        .expect("the restarted mux forwards");
    eprintln!(
        "restart after SIGKILL: control socket answering after {answering:?}, forwarding {:?} later",
        forwarding
    );
    assert_eq!(status(&again.socket)["io"]["mode"], "af_xdp");
    lab.signal(again.pid, libc::SIGTERM).unwrap();
    assert!(lab.wait(again.pid, Duration::from_secs(5)).is_some());
    assert!(
        !xdp_attached(mux_ns),
        "a stopped mux leaves nothing attached"
    );
}

#[test]
fn someone_elses_xdp_program_is_never_replaced() {
    require_root("xdp_netns::someone_elses_xdp_program_is_never_replaced");
    let mut lab = Lab::new("xdpother").unwrap();
    let fleet = fleet(&mut lab);
    let mux_ns = fleet.muxes[0].clone();
    // Another tool's program, attached from inside the mux's namespace; the test holds its
    // link for the whole test.
    let other = mux_ns
        .enter(|| {
            use lb_dataplane::xdp::bpf;
            let program = bpf::load_xdp(&bpf::pass_program()).unwrap();
            let index = lb_dataplane::xdp::neighbour::link_info("m0").unwrap().index;
            let link = bpf::attach_link(&program, index, bpf::AttachMode::Driver).unwrap();
            (program, link)
        })
        .join()
        .unwrap();
    assert!(xdp_attached(&mux_ns));

    // io = "af_xdp": refuses to start, and says why.
    let path = lab.log_dir().join("strict.toml");
    let socket = lab.log_dir().join("strict.sock");
    std::fs::write(
        &path,
        config("af_xdp").replace("SOCKET", &format!("{socket:?}")),
    )
    .unwrap();
    let pid = lab
        .spawn(
            &mux_ns,
            Command::new(env!("CARGO_BIN_EXE_lb"))
                .args(["mux", "--no-metrics", "--config"])
                .arg(&path),
        )
        .unwrap();
    let exit = lab
        .wait(pid, Duration::from_secs(10))
        .expect("lb mux exits");
    assert!(!exit.success());
    let log = lab.log(pid);
    assert!(log.contains("someone else"), "{log}");

    // io = "auto": falls back to AF_PACKET, says so, and forwards.
    let mux = common::start_node(
        &mut lab,
        &mux_ns,
        "mux",
        "mux1",
        &config("auto"),
        &["--no-metrics"],
    );
    let s = status(&mux.socket);
    assert_eq!(s["io"]["mode"], "af_packet", "{s:#}");
    assert!(
        s["io"]["fallbacks"][0]
            .as_str()
            .unwrap()
            .contains("someone else"),
        "{s:#}"
    );
    let capture = EncapCapture::start(&fleet.backends[0]);
    assert!(forwarded_within(&fleet, &capture, 0, Duration::from_secs(5)).is_some());
    lab.signal(mux.pid, libc::SIGTERM).unwrap();
    assert!(lab.wait(mux.pid, Duration::from_secs(5)).is_some());
    assert!(xdp_attached(&mux_ns), "the other program is still attached");
    drop(other);
}

/// The number in `ethtool -S` output for `key`, if present.
fn ethtool_stat(ns: &Namespace, interface: &str, key: &str) -> Option<u64> {
    let out = ns.exec_checked("ethtool", &["-S", interface]).ok()?;
    out.lines().find_map(|l| {
        l.trim()
            .strip_prefix(&format!("{key}: "))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[test]
fn one_worker_reads_every_receive_queue() {
    require_root("xdp_netns::one_worker_reads_every_receive_queue");
    let mut lab = Lab::new("xdpqueues").unwrap();
    let fleet = fleet(&mut lab);
    let mux_ns = &fleet.muxes[0];
    let text = config("af_xdp").replace("workers = 2", "workers = 1");
    let mux = common::start_node(&mut lab, mux_ns, "mux", "mux1", &text, &["--no-metrics"]);
    let s = status(&mux.socket);
    assert_eq!(s["workers"].as_array().unwrap().len(), 1, "{s:#}");
    assert_eq!(s["io"]["queues"], 2, "{s:#}");
    // 32 datagrams onto each receive queue of the mux's veth: sent from AF_XDP sockets bound
    // to transmit queue 0 and 1 of the router's end (a veth delivers on the peer's queue of the
    // same index).
    let capture = EncapCapture::start(&fleet.backends[0]);
    let (mux_mac, router_mac) = (mux_ns.mac("m0").unwrap(), fleet.router.mac("r-m1").unwrap());
    fleet
        .router
        .enter(move || {
            use lb_dataplane::xdp::{neighbour, xsk};
            let index = neighbour::link_info("r-m1").unwrap().index;
            for queue in 0..2u16 {
                let config = xsk::XskConfig {
                    rx_frames: 0,
                    ..xsk::XskConfig::default()
                };
                let (_, mut tx, _, _) = xsk::Xsk::open(index, u32::from(queue), config).unwrap();
                for i in 0..32u16 {
                    let mut frame = Vec::new();
                    etherparse::PacketBuilder::ethernet2(router_mac, mux_mac)
                        .ipv4(Fleet::CLIENT.octets(), Fleet::VIP.octets(), 64)
                        .udp(44_000 + queue * 100 + i, ECHO)
                        .write(&mut frame, b"queue")
                        .unwrap();
                    assert!(tx.push_with(|buf| {
                        buf[..frame.len()].copy_from_slice(&frame);
                        frame.len()
                    }));
                }
                assert_eq!(tx.flush().unwrap(), 32);
            }
        })
        .join()
        .unwrap();
    let got = capture.wait_for(64, Duration::from_secs(5));
    assert_eq!(got.len(), 64, "every datagram through one worker");
    let per_queue: Vec<Option<u64>> = (0..2)
        .map(|q| ethtool_stat(mux_ns, "m0", &format!("rx_queue_{q}_xdp_packets")))
        .collect();
    if let [Some(q0), Some(q1)] = per_queue[..] {
        assert!(q0 >= 32 && q1 >= 32, "traffic on both queues: {q0}, {q1}");
    }
}
