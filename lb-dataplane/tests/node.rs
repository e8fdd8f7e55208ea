//! The whole mux node on in-memory devices, driven the way an operator drives it: real config
//! files, the real control socket (line-delimited JSON), frames in, encapsulated packets out,
//! decoded by an independent parser (etherparse).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use lb_core::packet::Link;
use lb_dataplane::control::ControlPlane;
use lb_dataplane::memory::{self, Collector, Injector, Sent};
use lb_dataplane::node::{Devices, Mux};
use lb_dataplane::socket::request;
use serde_json::{Value, json};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);

fn config_text(socket: &Path, backends: &[&str], mtu: u16) -> String {
    let mut s = format!(
        "[node]\nname = \"mux-test\"\naddress_v4 = \"198.18.11.2\"\nmtu = {mtu}\ncontrol_socket = {socket:?}\n\n\
         [[vip]]\nname = \"echo\"\naddress = \"{VIP}\"\nprotocol = \"udp\"\nport = 7\nencap = \"ipip\"\n"
    );
    for b in backends {
        s.push_str(&format!("  [[vip.backend]]\n  address = \"{b}\"\n"));
    }
    s
}

struct Node {
    mux: Option<Mux>,
    injectors: Vec<Injector>,
    collectors: Vec<Collector>,
    config: PathBuf,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(workers: usize, backends: &[&str]) -> Self {
        Self::start_with_mtu(workers, backends, 1600)
    }

    fn start_with_mtu(workers: usize, backends: &[&str], mtu: u16) -> Self {
        Self::start_with(workers, |socket| config_text(socket, backends, mtu))
    }

    /// A node on the config `text(socket)`.
    fn start_with(workers: usize, text: impl Fn(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("mux.sock");
        let config = dir.path().join("mux.toml");
        std::fs::write(&config, text(&socket)).unwrap();
        let (plane, _) = ControlPlane::start(&config).unwrap();
        let mut devices: Vec<Devices> = Vec::new();
        let (mut injectors, mut collectors) = (Vec::new(), Vec::new());
        for _ in 0..workers {
            let (rx, inject) = memory::receiver(Link::Ip);
            let (tx, collect) = memory::transmitter();
            devices.push((Box::new(rx), Box::new(tx)));
            injectors.push(inject);
            collectors.push(collect);
        }
        let mux = Mux::start(plane, devices, &socket).unwrap();
        Self {
            mux: Some(mux),
            injectors,
            collectors,
            config,
            socket,
            _dir: dir,
        }
    }

    fn ask(&self, req: Value) -> Value {
        request(&self.socket, &req).unwrap()
    }

    /// Sends `count` datagrams of flow `sport` through worker `worker`, returns the backends
    /// they reached (after decoding every packet).
    fn send(&self, worker: usize, sport: u16, seq: std::ops::Range<u32>) {
        for s in seq {
            assert!(self.injectors[worker].inject(&udp(sport, s)));
        }
    }

    fn collect(&self, want: usize) -> Vec<Sent> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < want && Instant::now() < deadline {
            for c in &self.collectors {
                got.extend(c.drain());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        got
    }

    /// Status once the workers have published `frames` frames (reports are periodic).
    fn status_after(&self, frames: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.ask(json!({"command": "status"}));
            if status["counters"]["frames"].as_u64() >= Some(frames) || Instant::now() > deadline {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(m) = self.mux.take() {
            m.stop();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

fn udp(sport: u16, seq: u32) -> Vec<u8> {
    udp_sized(sport, seq, 4)
}

/// A datagram of flow `sport` with `payload` bytes of payload, starting with `seq`.
fn udp_sized(sport: u16, seq: u32, payload: usize) -> Vec<u8> {
    let b = PacketBuilder::ipv4([198, 18, 1, 2], VIP.octets(), 64).udp(sport, 7);
    let mut bytes = vec![0xa5; payload.max(4)];
    bytes[..4].copy_from_slice(&seq.to_be_bytes());
    let mut out = Vec::with_capacity(b.size(bytes.len()));
    b.write(&mut out, &bytes).unwrap();
    out
}

/// Decodes an encapsulated packet with etherparse: (outer dst, inner source port, inner seq).
fn decode(sent: &Sent) -> (IpAddr, u16, u32) {
    let outer = SlicedPacket::from_ip(&sent.packet).expect("outer packet parses");
    let Some(NetSlice::Ipv4(o)) = &outer.net else {
        panic!("outer is not IPv4")
    };
    let h = o.header();
    assert_eq!(h.protocol(), etherparse::IpNumber::IPV4, "IP-in-IP");
    assert_eq!(h.source_addr(), Ipv4Addr::new(198, 18, 11, 2));
    assert_eq!(
        h.to_header().calc_header_checksum(),
        h.header_checksum(),
        "outer checksum"
    );
    assert_eq!(IpAddr::V4(h.destination_addr()), sent.destination);
    let inner = SlicedPacket::from_ip(o.payload().payload).expect("inner packet parses");
    let Some(TransportSlice::Udp(u)) = inner.transport else {
        panic!("inner is not UDP")
    };
    let seq = u32::from_be_bytes(u.payload()[..4].try_into().unwrap());
    (sent.destination, u.source_port(), seq)
}

#[test]
fn flows_stick_to_backends_and_every_packet_is_encapsulated() {
    let node = Node::start(2, &["198.18.21.2", "198.18.22.2", "198.18.23.2"]);
    for sport in 1000..1100u16 {
        node.send(usize::from(sport % 2), sport, 0..5);
    }
    let got = node.collect(500);
    assert_eq!(got.len(), 500);
    let mut backend_of: HashMap<u16, IpAddr> = HashMap::new();
    let mut last_seq: HashMap<u16, u32> = HashMap::new();
    for s in &got {
        let (to, sport, seq) = decode(s);
        assert_eq!(
            *backend_of.entry(sport).or_insert(to),
            to,
            "flow {sport} moved"
        );
        if let Some(prev) = last_seq.insert(sport, seq) {
            assert!(seq > prev, "flow {sport} reordered");
        }
    }
    let used: std::collections::HashSet<_> = backend_of.values().collect();
    assert_eq!(used.len(), 3, "100 flows use every backend");
    let status = node.status_after(500);
    assert_eq!(status["ok"], true);
    assert_eq!(status["generation"], 1);
    assert_eq!(status["counters"]["frames"], 500, "{status:#}");
    assert_eq!(status["counters"]["encapsulated"], 500);
    let per_backend: u64 = status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["packets"].as_u64().unwrap())
        .sum();
    assert_eq!(per_backend, 500);
    assert!(
        status["vips"][0]["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("0x")
    );
}

#[test]
fn malformed_frames_are_counted_and_dropped_and_the_node_keeps_forwarding() {
    let node = Node::start(1, &["198.18.21.2"]);
    let good = udp(4000, 1);
    let mut bad_version = good.clone();
    bad_version[0] = 0x75;
    let truncated = good[..15].to_vec();
    let mut bad_length = good.clone();
    bad_length[2] = 0xff;
    for frame in [
        &[][..],
        &truncated,
        &bad_version,
        &bad_length,
        &[0xff; 100][..],
    ] {
        assert!(node.injectors[0].inject(frame));
    }
    node.send(0, 4000, 2..3);
    let got = node.collect(1);
    assert_eq!(got.len(), 1);
    assert_eq!(decode(&got[0]).2, 2);
    let status = node.status_after(6);
    let drops = &status["counters"]["drops"];
    let total: u64 = drops
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 5, "{drops}");
    assert_eq!(drops["internal"], 0);
}

#[test]
fn reload_drain_and_health_change_the_table_and_keep_what_they_should() {
    let mut node = Node::start(1, &["198.18.21.2", "198.18.22.2"]);
    // Find a flow on each backend.
    for sport in 2000..2040u16 {
        node.send(0, sport, 0..1);
    }
    let mut by_backend: HashMap<IpAddr, Vec<u16>> = HashMap::new();
    for s in node.collect(40) {
        let (to, sport, _) = decode(&s);
        by_backend.entry(to).or_default().push(sport);
    }
    let be1: IpAddr = "198.18.21.2".parse().unwrap();
    let be2: IpAddr = "198.18.22.2".parse().unwrap();
    let on_be1 = by_backend[&be1].clone();

    // Drain be1: its tracked flows stay, new flows avoid it.
    let answer = node.ask(json!({"command": "drain", "backend": "198.18.21.2"}));
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["generation"], 2);
    std::thread::sleep(Duration::from_millis(100));
    for &sport in &on_be1 {
        node.send(0, sport, 1..2);
    }
    for sport in 3000..3040u16 {
        node.send(0, sport, 0..1);
    }
    for s in node.collect(on_be1.len() + 40) {
        let (to, sport, _) = decode(&s);
        if sport < 3000 {
            assert_eq!(to, be1, "a tracked flow leaves its drained backend");
        } else {
            assert_eq!(to, be2, "a new flow reaches a drained backend");
        }
    }
    let status = node.ask(json!({"command": "status"}));
    assert_eq!(status["vips"][0]["backends"][0]["drained"], true);
    assert_eq!(status["vips"][0]["backends"][0]["effective_weight"], 0);

    // Unhealthy be1: even its tracked flows move.
    let answer =
        node.ask(json!({"command": "set-health", "backend": "198.18.21.2", "healthy": false}));
    assert_eq!(answer["ok"], true, "{answer}");
    std::thread::sleep(Duration::from_millis(100));
    for &sport in &on_be1 {
        node.send(0, sport, 2..3);
    }
    for s in node.collect(on_be1.len()) {
        assert_eq!(decode(&s).0, be2, "a flow stays on an unhealthy backend");
    }

    // Unknown backends and VIPs, bad requests: clear errors, nothing published.
    let generation = node.ask(json!({"command": "status"}))["generation"].clone();
    for bad in [
        json!({"command": "drain", "backend": "198.18.99.9"}),
        json!({"command": "drain", "backend": "198.18.21.2", "vip": "nope"}),
        json!({"command": "explode"}),
    ] {
        let answer = node.ask(bad.clone());
        assert_eq!(answer["ok"], false, "{bad} → {answer}");
        assert!(answer["error"].as_str().unwrap().len() > 5);
    }
    assert_eq!(
        node.ask(json!({"command": "status"}))["generation"],
        generation
    );

    // A bad config file is rejected with the field named; the old snapshot keeps serving.
    let good_text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(&node.config, good_text.replace("port = 7", "port = 70000")).unwrap();
    let answer = node.ask(json!({"command": "reload"}));
    assert_eq!(answer["ok"], false);
    assert!(
        answer["error"].as_str().unwrap().contains("port"),
        "{answer}"
    );
    let status = node.ask(json!({"command": "status"}));
    assert_eq!(status["generation"], generation);
    assert_eq!(status["reloads"]["failed"], 1);
    node.send(0, 2000, 9..10);
    assert_eq!(node.collect(1).len(), 1, "the old config keeps serving");

    // A good reload publishes, and keeps health and drain state of backends still present.
    std::fs::write(&node.config, &good_text).unwrap();
    let answer = node.ask(json!({"command": "reload"}));
    assert_eq!(answer["ok"], true, "{answer}");
    let status = node.ask(json!({"command": "status"}));
    assert_eq!(status["vips"][0]["backends"][0]["healthy"], false);

    // sync-health (the sidecar's full state): one snapshot for every change at once; pairs the
    // config lacks are listed, not fatal; the same state again publishes nothing.
    let vip = status["vips"][0]["name"].as_str().unwrap().to_owned();
    let before = status["generation"].as_u64().unwrap();
    let sync = json!({"command": "sync-health", "backends": [
        {"vip": vip, "backend": "198.18.21.2", "healthy": true},
        {"vip": vip, "backend": "198.18.22.2", "healthy": true},
        {"vip": vip, "backend": "198.18.99.9", "healthy": false},
        {"vip": "nope", "backend": "198.18.21.2", "healthy": false},
    ]});
    let answer = node.ask(sync.clone());
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["changed"], 1, "{answer}");
    assert_eq!(answer["ignored"].as_array().unwrap().len(), 2, "{answer}");
    assert_eq!(answer["generation"], before + 1);
    let answer = node.ask(sync);
    assert_eq!(answer["changed"], 0, "{answer}");
    let workers = node.ask(json!({"command": "workers"}));
    assert_eq!(workers["generation"], before + 1, "{workers}");
    let list = workers["workers"].as_array().unwrap();
    assert!(!list.is_empty(), "{workers}");
    assert!(
        list.iter()
            .all(|w| w["last_seen_ms"].as_u64().is_some_and(|ms| ms < 1000)),
        "{workers}"
    );
    assert_eq!(answer["generation"], before + 1);
    let status = node.ask(json!({"command": "status"}));
    assert_eq!(status["vips"][0]["backends"][0]["healthy"], true);
    node.stop();
}

#[test]
fn long_and_short_frames_of_a_flow_keep_their_order() {
    // Frames longer than a slot of the worker's batch arena (2048 bytes) are decided apart from
    // the batch; they must still leave between the short frames around them.
    let node = Node::start_with_mtu(1, &["198.18.21.2", "198.18.22.2"], 9000);
    let pattern = [0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1];
    let (mut frames, mut bytes) = (0u64, 0u64);
    for round in 0..20u32 {
        for (i, &long) in pattern.iter().enumerate() {
            let seq = round * 100 + u32::try_from(i).unwrap();
            let frame = udp_sized(6000, seq, if long == 1 { 4000 } else { 4 });
            bytes += frame.len() as u64;
            frames += 1;
            assert!(node.injectors[0].inject(&frame));
        }
    }
    let want = usize::try_from(frames).unwrap();
    let got = node.collect(want);
    assert_eq!(got.len(), want);
    let mut last = None;
    let mut backends = std::collections::HashSet::new();
    for s in &got {
        let (to, sport, seq) = decode(s);
        assert_eq!(sport, 6000);
        backends.insert(to);
        let long = pattern[usize::try_from(seq % 100).unwrap()] == 1;
        assert_eq!(s.packet.len() > 2048, long, "frame {seq} kept its length");
        assert!(last < Some(seq), "{seq} after {last:?}: reordered");
        last = Some(seq);
    }
    assert_eq!(backends.len(), 1, "one flow, one backend");
    let status = node.status_after(frames);
    assert_eq!(status["counters"]["encapsulated"], frames, "{status:#}");
    let backends = status["vips"][0]["backends"].as_array().unwrap();
    let sum = |field: &str| -> u64 { backends.iter().map(|b| b[field].as_u64().unwrap()).sum() };
    assert_eq!(sum("packets"), frames);
    assert_eq!(sum("bytes"), bytes, "bytes of the frames as received");
}

/// `frame` with the IPv4 "don't fragment" flag set (and its header checksum updated).
fn with_dont_fragment(mut frame: Vec<u8>) -> Vec<u8> {
    let (mut h, _) = etherparse::Ipv4Header::from_slice(&frame).unwrap();
    h.dont_fragment = true;
    h.header_checksum = h.calc_header_checksum();
    frame[..20].copy_from_slice(&h.to_bytes());
    frame
}

#[test]
fn too_big_frames_short_and_long_get_their_icmp_answer_in_order() {
    // MTU 1600: a 1700-byte frame (decided in the batch arena) and a 4000-byte one (decided
    // alone) with DF both get "fragmentation needed"; the small frames around them pass.
    let node = Node::start_with_mtu(1, &["198.18.21.2"], 1600);
    let frames = [
        udp_sized(7000, 0, 4),
        with_dont_fragment(udp_sized(7000, 1, 1700 - 28)),
        udp_sized(7000, 2, 4),
        with_dont_fragment(udp_sized(7000, 3, 4000 - 28)),
        udp_sized(7000, 4, 4),
    ];
    for f in &frames {
        assert!(node.injectors[0].inject(f));
    }
    let got = node.collect(frames.len());
    assert_eq!(got.len(), frames.len());
    let client: IpAddr = Ipv4Addr::new(198, 18, 1, 2).into();
    for (i, s) in got.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(decode(s).2, u32::try_from(i).unwrap());
            continue;
        }
        assert_eq!(s.destination, client, "packet {i} answers the client");
        assert!(
            s.packet.len() <= 576,
            "packet {i}: {} bytes",
            s.packet.len()
        );
        let reply = SlicedPacket::from_ip(&s.packet).expect("the reply parses");
        let Some(TransportSlice::Icmpv4(icmp)) = reply.transport else {
            panic!("packet {i} is not ICMP")
        };
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1600 - 20
                }
            ),
            "packet {i}"
        );
        // The quote starts with the frame's own IP header.
        assert_eq!(&icmp.payload()[..20], &frames[i][..20], "packet {i}");
    }
    let status = node.status_after(5);
    let counters = &status["counters"];
    assert_eq!(counters["drops"]["internal"], 0, "{counters}");
    assert_eq!(counters["encapsulated"], 3, "{counters}");
    assert_eq!(counters["icmp_too_big_sent"], 2, "{counters}");
}

#[test]
fn shutdown_flushes_everything_received() {
    let mut node = Node::start(2, &["198.18.21.2", "198.18.22.2"]);
    for sport in 5000..5200u16 {
        node.send(usize::from(sport % 2), sport, 0..3);
    }
    // Wait until the workers have taken everything, then stop: nothing may be left queued.
    node.status_after(600);
    let socket = node.socket.clone();
    node.stop();
    let got: usize = node.collectors.iter().map(|c| c.drain().len()).sum();
    assert_eq!(got, 600);
    assert!(
        !socket.exists(),
        "the control socket file is removed on stop"
    );
}

#[test]
fn a_second_node_cannot_take_a_live_control_socket() {
    let node = Node::start(1, &["198.18.21.2"]);
    let (plane, _) = ControlPlane::start(&node.config).unwrap();
    let err = Mux::start(plane, Vec::new(), &node.socket).unwrap_err();
    assert!(err.to_string().contains("another process"), "{err}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&node.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// A config of `vips` UDP VIPs (`v0`, `v1`, …, ports 7000 + i) with two backends each.
fn many_vips_text(socket: &Path, vips: usize, table_size: u32) -> String {
    let mut s = format!(
        "[node]\nname = \"mux-test\"\naddress_v4 = \"198.18.11.2\"\ncontrol_socket = {socket:?}\n"
    );
    for i in 0..vips {
        s.push_str(&format!(
            "\n[[vip]]\nname = \"v{i}\"\naddress = \"{VIP}\"\nprotocol = \"udp\"\nport = {}\nencap = \"ipip\"\ntable_size = {table_size}\n  [[vip.backend]]\n  address = \"198.18.21.2\"\n  [[vip.backend]]\n  address = \"198.18.22.2\"\n",
            7000 + i
        ));
    }
    s
}

/// The generation and the number of VIPs with backends, as `status` shows them.
fn published(node: &Node) -> (u64, usize) {
    let status = node.ask(json!({"command": "status"}));
    let serving = status["vips"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] == "serving")
        .count();
    (status["generation"].as_u64().unwrap(), serving)
}

#[test]
fn a_config_rewritten_slowly_in_place_never_publishes_a_prefix() {
    use std::io::Write as _;
    let node = Node::start_with(1, |socket| many_vips_text(socket, 4, 257));
    let text = std::fs::read_to_string(&node.config).unwrap();
    // Rewrite the same contents one line every 60 ms, the file open throughout (a slow `cat >`),
    // while watching what the node publishes.
    let writer = {
        let path = node.config.clone();
        let text = text.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(&path).unwrap();
            for line in text.split_inclusive('\n') {
                f.write_all(line.as_bytes()).unwrap();
                f.flush().unwrap();
                std::thread::sleep(Duration::from_millis(60));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        assert_eq!(
            published(&node),
            (1, 4),
            "a prefix of the file was published"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    writer.join().unwrap();

    // The same again with a real change at the end (a fifth VIP): only the whole file counts.
    let longer = many_vips_text(&node.socket, 5, 257);
    let writer = {
        let path = node.config.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(&path).unwrap();
            for line in longer.split_inclusive('\n') {
                f.write_all(line.as_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(40));
            }
        })
    };
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline && seen.last() != Some(&(2, 5)) {
        let p = published(&node);
        if seen.last() != Some(&p) {
            seen.push(p);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    writer.join().unwrap();
    assert_eq!(
        seen,
        vec![(1, 4), (2, 5)],
        "only the complete file is published"
    );
}

#[test]
fn a_watched_change_removing_most_vips_or_emptying_one_is_held_until_an_explicit_reload() {
    let node = Node::start_with(1, |socket| many_vips_text(socket, 4, 257));
    // Complete, valid, but only one VIP left: held.
    std::fs::write(&node.config, many_vips_text(&node.socket, 1, 257)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let status = node.ask(json!({"command": "status"}));
        if status["reloads"]["held"].is_string() || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let held = status["reloads"]["held"].as_str().unwrap_or_default();
    assert!(held.contains("remove 3 of the 4 VIPs"), "{status}");
    assert_eq!(published(&node), (1, 4));
    // An explicit reload applies it.
    let answer = node.ask(json!({"command": "reload"}));
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(published(&node), (2, 1));
    assert!(node.ask(json!({"command": "status"}))["reloads"]["held"].is_null());

    // A VIP left with no backend: held too.
    let emptied = many_vips_text(&node.socket, 1, 257)
        .replace("  [[vip.backend]]\n  address = \"198.18.21.2\"\n  [[vip.backend]]\n  address = \"198.18.22.2\"\n", "");
    std::fs::write(&node.config, emptied).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node.ask(json!({"command": "status"}))["reloads"]["held"].is_string() {
        assert!(Instant::now() < deadline, "no hold for an emptied VIP");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = node.ask(json!({"command": "status"}));
    assert!(
        status["reloads"]["held"]
            .as_str()
            .unwrap()
            .contains("v0 with no backend"),
        "{status}"
    );
    assert_eq!(published(&node), (2, 1));
}

#[test]
fn status_answers_while_a_large_config_compiles_and_a_fifo_never_wedges_a_reload() {
    let node = Node::start_with(1, |socket| many_vips_text(socket, 2, 257));
    // 64 VIPs of 655 373 slots: about a second of compile in the test profile (its
    // dependencies are built with opt-level 2), long enough that a status delayed by the
    // compile shows against the scheduling noise of a busy 2-core machine.
    std::fs::write(&node.config, many_vips_text(&node.socket, 64, 655_373)).unwrap();
    let socket = node.socket.clone();
    let reload = std::thread::spawn(move || {
        let started = Instant::now();
        let answer = request(&socket, &json!({"command": "reload"})).unwrap();
        (answer, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut slowest = Duration::ZERO;
    while !reload.is_finished() {
        let started = Instant::now();
        let status = node.ask(json!({"command": "status"}));
        assert_eq!(status["ok"], true);
        node.ask(json!({"command": "workers"}));
        slowest = slowest.max(started.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    let (answer, compile) = reload.join().unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    eprintln!("compile {compile:?}, slowest status {slowest:?}");
    assert!(
        compile > Duration::from_millis(300) && slowest < compile / 2,
        "status waited for the compile: slowest answer {slowest:?}, compile {compile:?}"
    );

    // A FIFO at the config path: the reload fails at once, naming it; the node serves on.
    std::fs::remove_file(&node.config).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&node.config)
        .status()
        .unwrap();
    assert!(made.success());
    let started = Instant::now();
    let answer = node.ask(json!({"command": "reload"}));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(answer["ok"], false);
    assert!(
        answer["error"].as_str().unwrap().contains("FIFO"),
        "{answer}"
    );
    assert_eq!(published(&node).1, 64);
}

#[test]
fn a_reload_over_the_memory_budget_is_refused_and_the_old_config_serves() {
    let node = Node::start_with(1, |socket| many_vips_text(socket, 2, 257));
    let over = many_vips_text(&node.socket, 8, 16_777_213)
        .replace("[node]\n", "[node]\nmemory_budget_mb = 256\n");
    std::fs::write(&node.config, over).unwrap();
    let answer = node.ask(json!({"command": "reload"}));
    assert_eq!(answer["ok"], false, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("node.memory_budget_mb") && error.contains("needs about"),
        "{error}"
    );
    assert_eq!(published(&node), (1, 2));
}

#[test]
fn the_control_socket_answers_every_line_refuses_unknown_fields_and_caps_connections() {
    use std::io::{BufRead as _, BufReader, Write as _};
    use std::os::unix::net::UnixStream;
    let node = Node::start(1, &["198.18.21.2"]);
    let mut stream = UnixStream::connect(&node.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ask_raw = |line: &str| {
        writeln!(stream, "{line}").unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        serde_json::from_str::<Value>(&answer).unwrap()
    };
    let blank = ask_raw("");
    assert_eq!(blank["ok"], false, "{blank}");
    assert!(blank["error"].as_str().unwrap().contains("empty request"));
    for bad in [
        r#"{"command":"status","verbose":true}"#,
        r#"{"command":"drain","backend":"198.18.21.2","force":true}"#,
        r#"["status"]"#,
    ] {
        let answer = ask_raw(bad);
        assert_eq!(answer["ok"], false, "{bad} → {answer}");
    }
    let unknown = ask_raw(r#"{"command":"status","verbose":true}"#);
    assert!(
        unknown["error"].as_str().unwrap().contains("verbose"),
        "{unknown}"
    );
    assert_eq!(ask_raw(r#"{"command":"workers"}"#)["ok"], true);

    // Connections over the cap get one error line and are closed; the node stays reachable.
    let cap = lb_dataplane::socket::MAX_CONNECTIONS;
    let mut held: Vec<UnixStream> = (0..cap + 8)
        .map(|_| UnixStream::connect(&node.socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut refused = 0;
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut line = String::new();
        if BufReader::new(&*s)
            .read_line(&mut line)
            .is_ok_and(|n| n > 0)
        {
            assert!(line.contains("too many control connections"), "{line}");
            refused += 1;
        }
    }
    // The first connection (above) holds one slot too.
    assert_eq!(refused, 9, "{cap} allowed");
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(node.ask(json!({"command": "status"}))["ok"], true);
}
