//! The network-namespace harness itself (`lb::netns`, `lb::topology`, `tests/common`), as root.
//!
//! Proves that a built fleet forwards client → backend through the router and spreads VIP
//! flows over the muxes by ECMP (plain and resilient); that `EncapCapture` in a backend
//! decodes IP-in-IP, GRE with a key and IPv6-in-IPv4 sent from a mux; that dropping a lab
//! kills its processes (also ones it did not spawn directly) and deletes its namespaces; and
//! that a new lab removes stale namespaces of dead runs, but not those of live ones.
//!
//! Every test needs root and fails with `require_root`'s message otherwise.

mod common;

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{EncapCapture, UdpSink, decode, flow_payload, parse_flow_payload, udp_flows};
use etherparse::{IpNumber, Ipv4Header, PacketBuilder};
use lb::netns::{Lab, Namespace, VethEnd, require_root};
use lb::topology::{Fleet, FleetPlan};

const WHAT: &str = "tests/netns_harness.rs";

fn fleet(tag: &str, plan: FleetPlan) -> (Lab, Fleet) {
    require_root(WHAT);
    let mut lab = Lab::new(tag).expect("lab");
    let fleet = Fleet::build(&mut lab, &plan).expect("fleet builds");
    (lab, fleet)
}

fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `pid` is a live process (a zombie counts as gone).
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

#[test]
fn fleet_forwards_client_to_backend_through_the_router() {
    let (_lab, fleet) = fleet(
        "nhfwd",
        FleetPlan {
            muxes: 2,
            backends: 2,
            resilient: false,
            ipv6: false,
        },
    );
    // The settings the lab's facts require.
    assert_eq!(
        fleet.router.read_sysctl("net.ipv4.ip_forward").unwrap(),
        "1"
    );
    assert_eq!(
        fleet
            .router
            .read_sysctl("net.ipv4.fib_multipath_hash_policy")
            .unwrap(),
        "1"
    );
    for ns in fleet
        .muxes
        .iter()
        .chain(&fleet.backends)
        .chain([&fleet.client])
    {
        assert_eq!(ns.read_sysctl("net.ipv4.ip_forward").unwrap(), "0", "{ns}");
        assert_eq!(
            ns.read_sysctl("net.ipv4.conf.all.rp_filter").unwrap(),
            "0",
            "{ns}"
        );
    }
    // Cross-check the setns-based sysctl access with a process started by `ip netns exec`.
    let cat = |ns: &Namespace, file: &str| ns.exec_checked("cat", &[file]).unwrap();
    assert_eq!(
        cat(&fleet.router, "/proc/sys/net/ipv4/ip_forward").trim(),
        "1"
    );
    assert_eq!(
        cat(fleet.mux(1), "/proc/sys/net/ipv4/ip_forward").trim(),
        "0"
    );
    assert_eq!(
        cat(&fleet.router, "/proc/sys/net/ipv4/fib_multipath_hash_seed").trim(),
        Fleet::HASH_SEED.to_string()
    );
    let vip = Fleet::VIP.to_string();
    for ns in fleet.muxes.iter().chain(&fleet.backends) {
        let addrs = ns.ip(&["-br", "addr"]).unwrap();
        assert!(!addrs.contains(&vip), "{ns} has no VIP by default: {addrs}");
    }
    let offload = fleet.client.exec_checked("ethtool", &["-k", "c0"]).unwrap();
    assert!(
        offload.contains("tx-checksumming: off"),
        "client tx checksum offload is off: {offload}"
    );

    // Client → backend 1, routed by the router (different subnets), received in be1.
    let to = SocketAddrV4::new(Fleet::backend_address(1), 9000);
    let sink = UdpSink::start(fleet.backend(1), to, 12, Duration::from_secs(5));
    let ports = udp_flows(&fleet.client, *to.ip(), to.port(), 4, 3).expect("send");
    let got = sink.finish();
    assert_eq!(got.len(), 12, "all datagrams arrive: {got:?}");
    for (from, payload) in &got {
        assert_eq!(from.ip(), IpAddr::V4(Fleet::CLIENT), "not NATed");
        let (flow, seq) = parse_flow_payload(payload).expect("a flow payload");
        assert_eq!(from.port(), ports[flow as usize]);
        assert!(seq < 3);
    }

    // VIP traffic is spread over both muxes by the L4 hash; their kernels drop it.
    let before: Vec<u64> = (1..=2)
        .map(|i| fleet.mux(i).rx_packets("m0").unwrap())
        .collect();
    udp_flows(&fleet.client, Fleet::VIP, 5000, 64, 2).expect("send to VIP");
    std::thread::sleep(Duration::from_millis(200));
    let delta: Vec<u64> = (1..=2)
        .map(|i| fleet.mux(i).rx_packets("m0").unwrap() - before[i - 1])
        .collect();
    assert!(
        delta.iter().all(|&d| d > 0) && delta.iter().sum::<u64>() >= 128,
        "64 flows spread over both muxes: {delta:?}"
    );

    // Plain multipath route; withdrawn by an empty list.
    let route = fleet.router.ip(&["route", "show", &vip]).unwrap();
    assert!(
        route.contains("nexthop via 198.18.11.2 dev r-m1")
            && route.contains("nexthop via 198.18.12.2 dev r-m2"),
        "{route}"
    );
    fleet.route_vip_via(&[]).unwrap();
    assert_eq!(
        fleet.router.ip(&["route", "show", &vip]).unwrap().trim(),
        ""
    );
    assert!(fleet.route_vip_via(&[3]).is_err(), "no mux 3");

    fleet.add_backend_vips().unwrap();
    for ns in &fleet.backends {
        let lo = ns.ip(&["-br", "addr", "show", "lo"]).unwrap();
        assert!(lo.contains(&format!("{vip}/32")), "{lo}");
    }
}

#[test]
fn resilient_group_sends_everything_to_the_remaining_mux() {
    let (_lab, fleet) = fleet(
        "nhres",
        FleetPlan {
            muxes: 2,
            backends: 1,
            resilient: true,
            ipv6: false,
        },
    );
    let group = fleet.router.ip(&["nexthop", "show", "id", "100"]).unwrap();
    assert!(group.contains("resilient"), "{group}");

    fleet.route_vip_via(&[2]).unwrap();
    let before: Vec<u64> = (1..=2)
        .map(|i| fleet.mux(i).rx_packets("m0").unwrap())
        .collect();
    udp_flows(&fleet.client, Fleet::VIP, 5000, 32, 2).expect("send to VIP");
    std::thread::sleep(Duration::from_millis(200));
    let delta: Vec<u64> = (1..=2)
        .map(|i| fleet.mux(i).rx_packets("m0").unwrap() - before[i - 1])
        .collect();
    // Mux 1 may see a little link noise (IPv6 neighbour discovery), never the 64 datagrams.
    assert!(delta[1] >= 64 && delta[0] < 8, "{delta:?}");
}

/// An IPv4 header for `payload_len` bytes of protocol `protocol`, checksum filled in.
fn outer_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload_len: usize) -> Vec<u8> {
    let mut header = Ipv4Header::new(
        u16::try_from(payload_len).unwrap(),
        64,
        IpNumber(protocol),
        src.octets(),
        dst.octets(),
    )
    .unwrap();
    header.header_checksum = header.calc_header_checksum();
    let mut out = Vec::new();
    header.write(&mut out).unwrap();
    out
}

/// Sends a complete IPv4 packet from the namespace through an IPPROTO_RAW socket.
fn send_raw_ipv4(ns: &Namespace, packets: Vec<Vec<u8>>) {
    ns.enter(move || {
        // SAFETY: socket takes plain integers and returns a new descriptor or -1.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just opened and nothing else owns it.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        for packet in packets {
            let dst = [packet[16], packet[17], packet[18], packet[19]];
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(dst),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `packet` is valid for reads of its length and `addr` is a valid
            // sockaddr_in of the size passed, both for the whole call.
            let sent = unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            assert_eq!(
                usize::try_from(sent).ok(),
                Some(packet.len()),
                "sendto: {}",
                std::io::Error::last_os_error()
            );
        }
    })
    .join()
    .expect("raw sender");
}

#[test]
fn encap_capture_decodes_what_a_mux_sends() {
    let (_lab, fleet) = fleet(
        "nhcap",
        FleetPlan {
            muxes: 2,
            backends: 2,
            resilient: false,
            ipv6: false,
        },
    );
    let mux = Fleet::mux_address(1);
    let backend = Fleet::backend_address(2);
    let capture = EncapCapture::start(fleet.backend(2));

    // IP-in-IP: client → VIP UDP inside.
    let mut inner_udp = Vec::new();
    PacketBuilder::ipv4(Fleet::CLIENT.octets(), Fleet::VIP.octets(), 64)
        .udp(40000, 80)
        .write(&mut inner_udp, &flow_payload(7, 1))
        .unwrap();
    let mut ipip = outer_header(mux, backend, 4, inner_udp.len());
    ipip.extend_from_slice(&inner_udp);

    // GRE with key 0xdeadbeef: client → VIP TCP inside.
    let mut inner_tcp = Vec::new();
    PacketBuilder::ipv4(Fleet::CLIENT.octets(), Fleet::VIP.octets(), 64)
        .tcp(40001, 443, 1000, 65535)
        .write(&mut inner_tcp, b"hello")
        .unwrap();
    let mut gre_body = vec![0x20, 0x00, 0x08, 0x00];
    gre_body.extend_from_slice(&0xdead_beef_u32.to_be_bytes());
    gre_body.extend_from_slice(&inner_tcp);
    let mut gre = outer_header(mux, backend, 47, gre_body.len());
    gre.extend_from_slice(&gre_body);

    // IPv6-in-IPv4: UDP between benchmarking IPv6 addresses (2001:2::/48).
    let v6_src = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
    let v6_dst = Ipv6Addr::new(0x2001, 2, 0, 0x100, 0, 0, 0, 1);
    let mut inner_v6 = Vec::new();
    PacketBuilder::ipv6(v6_src.octets(), v6_dst.octets(), 64)
        .udp(40002, 53)
        .write(&mut inner_v6, b"six")
        .unwrap();
    let mut sixin4 = outer_header(mux, backend, 41, inner_v6.len());
    sixin4.extend_from_slice(&inner_v6);

    send_raw_ipv4(fleet.mux(1), vec![ipip, gre, sixin4]);
    capture.wait_for(3, Duration::from_secs(5));
    let got = capture.stop();
    assert_eq!(got.len(), 3, "{got:#?}");

    for c in &got {
        assert_eq!(c.outer_src, mux, "{c:?}");
        assert_eq!(c.outer_dst, backend, "{c:?}");
        assert!(c.outer_checksum_ok, "{c:?}");
    }
    let by_proto = |p: u8| {
        got.iter()
            .find(|c| c.outer_protocol == p)
            .expect("captured")
    };

    let c = by_proto(4);
    assert_eq!(c.gre, None);
    let inner = c.inner.as_ref().unwrap();
    assert_eq!(
        (
            inner.src,
            inner.dst,
            inner.protocol,
            inner.src_port,
            inner.dst_port
        ),
        (
            IpAddr::V4(Fleet::CLIENT),
            IpAddr::V4(Fleet::VIP),
            17,
            Some(40000),
            Some(80)
        )
    );
    assert_eq!(parse_flow_payload(&inner.payload), Some((7, 1)));

    let c = by_proto(47);
    let g = c.gre.as_ref().unwrap();
    assert_eq!(
        (g.protocol, g.key, g.sequence, g.checksum_ok),
        (0x0800, Some(0xdead_beef), None, None)
    );
    let inner = c.inner.as_ref().unwrap();
    assert_eq!(
        (
            inner.src,
            inner.dst,
            inner.protocol,
            inner.src_port,
            inner.dst_port
        ),
        (
            IpAddr::V4(Fleet::CLIENT),
            IpAddr::V4(Fleet::VIP),
            6,
            Some(40001),
            Some(443)
        )
    );
    assert_eq!(inner.payload, b"hello");

    let c = by_proto(41);
    let inner = c.inner.as_ref().unwrap();
    assert_eq!(
        (
            inner.src,
            inner.dst,
            inner.protocol,
            inner.src_port,
            inner.dst_port
        ),
        (
            IpAddr::V6(v6_src),
            IpAddr::V6(v6_dst),
            17,
            Some(40002),
            Some(53)
        )
    );
    assert_eq!(inner.payload, b"six");
}

#[test]
fn decode_checks_checksums_and_gre_options() {
    // No namespace needed: the decoder on hand-made bytes.
    let mut inner = Vec::new();
    PacketBuilder::ipv4([198, 18, 1, 2], [198, 18, 100, 1], 64)
        .udp(1, 2)
        .write(&mut inner, b"x")
        .unwrap();
    // GRE with checksum, key and sequence number.
    let mut body = vec![0xb0, 0x00, 0x08, 0x00, 0, 0, 0, 0];
    body.extend_from_slice(&5u32.to_be_bytes());
    body.extend_from_slice(&9u32.to_be_bytes());
    body.extend_from_slice(&inner);
    let sum = common::internet_checksum(&body);
    body[4..6].copy_from_slice(&sum.to_be_bytes());
    let mut packet = outer_header(
        [198, 18, 11, 2].into(),
        [198, 18, 21, 2].into(),
        47,
        body.len(),
    );
    packet.extend_from_slice(&body);

    let c = decode(&packet);
    assert!(c.outer_checksum_ok);
    let g = c.gre.clone().unwrap();
    assert_eq!(
        (g.key, g.sequence, g.checksum_ok),
        (Some(5), Some(9), Some(true))
    );
    assert_eq!(c.inner.as_ref().unwrap().payload, b"x");

    let mut bad = packet.clone();
    bad[10] ^= 0xff; // outer header checksum
    bad[20 + 4] ^= 0x01; // GRE checksum
    let c = decode(&bad);
    assert!(!c.outer_checksum_ok);
    assert_eq!(c.gre.unwrap().checksum_ok, Some(false));

    let mut v1 = packet;
    v1[21] |= 1; // GRE version 1 is not ours
    assert!(decode(&v1).inner.is_err());
}

#[test]
fn drop_kills_processes_and_deletes_namespaces() {
    require_root(WHAT);
    let mut lab = Lab::new("nhdrop").expect("lab");
    let a = lab.namespace("a").unwrap();
    let b = lab.namespace("b").unwrap();
    lab.veth(
        VethEnd::new(&a, "x0", "198.18.200.1/30"),
        VethEnd::new(&b, "x1", "198.18.200.2/30"),
        1500,
    )
    .unwrap();
    let links = b.ip(&["-br", "addr", "show", "x1"]).unwrap();
    assert!(links.contains("198.18.200.2/30"), "{links}");

    // spawn, log, wait, signal.
    let shell = lab
        .spawn(
            &a,
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
        )
        .unwrap();
    let status = lab.wait(shell, Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(3));
    let log = lab.log(shell);
    assert!(log.contains("out") && log.contains("err"), "{log}");
    assert!(lab.signal(shell, 0).is_err(), "reaped: no longer signalled");
    assert!(lab.signal(std::process::id(), 0).is_err(), "not ours");

    let sleeper = lab.spawn(&a, Command::new("sleep").arg("60")).unwrap();
    lab.signal(sleeper, 0).expect("running");
    assert!(lab.wait(sleeper, Duration::from_millis(50)).is_none());
    // A grandchild the lab does not know about: only "kill what is inside" catches it.
    let parent = lab
        .spawn(
            &b,
            Command::new("sh").args(["-c", "sleep 61 & echo $!; wait"]),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let grandchild: u32 = loop {
        if let Ok(pid) = lab.log(parent).trim().parse() {
            break pid;
        }
        assert!(Instant::now() < deadline, "no pid in {:?}", lab.log(parent));
        std::thread::sleep(Duration::from_millis(20));
    };
    let pids = Command::new("ip")
        .args(["netns", "pids", a.name()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&pids.stdout)
            .lines()
            .any(|l| l.trim() == sleeper.to_string()),
        "sleep runs inside {a}"
    );

    let names = lab.namespace_names().to_vec();
    let dir = lab.log_dir().to_owned();
    assert!(names.iter().all(|n| n.starts_with(lab.prefix())));
    assert!(netns_list().contains(&names[0]));
    let started = Instant::now();
    drop(lab);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "drop is bounded"
    );

    let list = netns_list();
    for name in &names {
        assert!(!list.contains(name.as_str()), "{name} still listed: {list}");
        assert!(!Path::new("/run/netns").join(name).exists());
    }
    assert!(!alive(sleeper), "sleep {sleeper} killed");
    assert!(!alive(parent), "sh {parent} killed");
    assert!(!alive(grandchild), "grandchild {grandchild} killed");
    assert!(!dir.exists(), "log dir removed");
    assert!(a.ip(&["link"]).is_err(), "handle of a deleted namespace");
}

/// Deletes the namespaces a test made by hand, even if it fails.
struct DeleteOnDrop(Vec<String>);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

#[test]
fn new_lab_removes_stale_namespaces_of_dead_runs_only() {
    require_root(WHAT);
    // A pid that is no longer alive: a child that exited and was reaped.
    let mut done = Command::new("true").spawn().unwrap();
    done.wait().unwrap();
    let dead = done.id();
    let stale = format!("lbt-nhstale-{dead}-0-x");
    let live = format!("lbt-nhstale-{}-999-y", std::process::id());
    let _guard = DeleteOnDrop(vec![stale.clone(), live.clone()]);
    for name in [&stale, &live] {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    // A process left behind inside the stale namespace.
    let mut leftover = Command::new("ip")
        .args(["netns", "exec", &stale, "sleep", "60"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "pids", &stale])
            .output()
            .unwrap()
            .stdout,
    )
    .contains(&leftover.id().to_string())
    {
        assert!(Instant::now() < deadline, "sleep did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let lab = Lab::new("nhstale").expect("lab");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = leftover.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = leftover.kill();
            panic!("the leftover process was not killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let list = netns_list();
    assert!(!list.contains(&stale), "stale namespace removed: {list}");
    assert!(
        list.contains(&live),
        "a live run's namespace is kept: {list}"
    );
    drop(lab);
}
