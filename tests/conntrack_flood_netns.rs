//! The connection table under a spoofed SYN+ACK flood, in network namespaces (root): issue 12,
//! item 5. A mux with a small table (2048 slots, one worker) receives spoofed SYN+ACK pairs
//! (57 kpps, bounded in packets and time) from random sources of 198.19.128.0/17, while the
//! client keeps 30 connections opened before the flood busy and opens 30 more during it. Then a
//! backend is added by a reload: no connection of either group may break, although the new table
//! moves about a third of them (the test counts how many, so it can fail). When the flood's pairs
//! were trusted at their second packet, they filled the table, the connections opened during
//! the flood were not tracked, and the moved ones broke.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb::netns::{Lab, require_root};
use lb::topology::{Fleet, FleetPlan};
use lb_dataplane::socket::request;
use serde_json::{Value, json};

const PORT: u16 = 80;
/// Connections opened before the flood, and as many during it.
const CONNECTIONS: usize = 30;
/// The flood: pairs a second, and for how long.
const PAIRS_PER_SECOND: usize = 28_500;
const FLOOD: Duration = Duration::from_secs(4);

fn vip(backends: &[usize]) -> String {
    let mut s = format!(
        "\n[[vip]]\nname = \"web\"\naddress = \"{}\"\nprotocol = \"tcp\"\nport = {PORT}\nencap = \"ipip\"\n",
        Fleet::VIP
    );
    for &j in backends {
        s.push_str(&format!(
            "  [[vip.backend]]\n  address = \"{}\"\n",
            Fleet::backend_address(j)
        ));
    }
    s
}

fn mux_text(backends: &[usize]) -> String {
    format!(
        "[node]\nname = \"mux1\"\ninterface = \"m0\"\naddress_v4 = \"{}\"\nmtu = 1600\nworkers = 1\n\
         conntrack_capacity = 2048\ncontrol_socket = SOCKET\n{}",
        Fleet::mux_address(1),
        vip(backends)
    )
}

/// Spoofed pair `n`: a SYN, then an ACK, of a flow from 198.19.128.0/17 to the VIP, as frames
/// from the router to the mux.
fn spoofed_pair(n: usize, mux_mac: [u8; 6], router_mac: [u8; 6]) -> [Vec<u8>; 2] {
    let source = [198, 19, 128 + ((n >> 8) % 128) as u8, n as u8];
    let port = 1024 + (n >> 15) as u16;
    let frame = |syn: bool| {
        let mut out = Vec::with_capacity(64);
        let b = etherparse::PacketBuilder::ethernet2(router_mac, mux_mac)
            .ipv4(source, Fleet::VIP.octets(), 64)
            .tcp(port, PORT, 1000, 65535);
        let b = if syn { b.syn() } else { b.ack(1) };
        b.write(&mut out, &[]).unwrap();
        out
    };
    [frame(true), frame(false)]
}

/// One client connection: its reader, its writer, the backend that answered first.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    who: String,
    port: u16,
}

impl Conn {
    fn open(n: usize) -> Conn {
        let c = TcpStream::connect_timeout(
            &SocketAddrV4::new(Fleet::VIP, PORT).into(),
            Duration::from_secs(5),
        )
        .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        // One segment per line, sent at once: no wait for Nagle and delayed ACKs.
        c.set_nodelay(true).unwrap();
        let port = c.local_addr().unwrap().port();
        let writer = c.try_clone().unwrap();
        let mut conn = Conn {
            reader: BufReader::new(c),
            writer,
            who: String::new(),
            port,
        };
        conn.who = conn.ask(&format!("hello {n}")).expect("first answer");
        conn
    }

    /// Sends a line; the backend that answered, if it did.
    fn ask(&mut self, line: &str) -> Option<String> {
        let mut answer = String::new();
        self.writer.write_all(format!("{line}\n").as_bytes()).ok()?;
        match self.reader.read_line(&mut answer) {
            Ok(n) if n > 0 => answer.split(' ').next().map(str::to_owned),
            _ => None,
        }
    }

    /// Whether it still reaches the backend that answered first.
    fn alive(&mut self, line: &str) -> bool {
        self.ask(line).as_deref() == Some(self.who.as_str())
    }
}

/// Whether `table` (a VIP config) sends the client's flow from `port` to a backend other than
/// `who` ("be<j>").
fn moves(backends: &[usize], port: u16, who: &str) -> bool {
    let config =
        lb_core::config::Config::from_toml(&mux_text(backends).replace("SOCKET", "\"/x\""), "t")
            .unwrap();
    let table = config.vips[0].table().unwrap();
    let key = lb_core::flow::FlowKey::new(
        IpAddr::V4(Fleet::CLIENT),
        IpAddr::V4(Fleet::VIP),
        lb_core::flow::PROTO_TCP,
        port,
        PORT,
    )
    .unwrap();
    let to = table.lookup_backend(key.hash()).unwrap().id.0;
    format!(
        "be{}",
        (1..=3)
            .find(|&j| IpAddr::V4(Fleet::backend_address(j)) == to)
            .unwrap()
    ) != who
}

#[test]
fn connections_opened_during_a_syn_ack_flood_survive_a_backend_added() {
    require_root(
        "conntrack_flood_netns::connections_opened_during_a_syn_ack_flood_survive_a_backend_added",
    );
    let mut lab = Lab::new("ctflood").unwrap();
    let fleet = Fleet::build(
        &mut lab,
        &FleetPlan {
            muxes: 1,
            backends: 3,
            resilient: false,
            ipv6: false,
        },
    )
    .unwrap();
    fleet.add_backend_vips().unwrap();
    let muxes = format!("[\"{}/32\"]", Fleet::mux_address(1));
    for j in 1..=3 {
        let text = format!(
            "[node]\nname = \"be{j}\"\ninterface = \"b0\"\naddress_v4 = \"{}\"\ncontrol_socket = SOCKET\n\
             [agent]\nmuxes = {muxes}\n{}",
            Fleet::backend_address(j),
            vip(&[1, 2, 3])
        );
        common::start_node(
            &mut lab,
            &fleet.backends[j - 1],
            "agent",
            &format!("agent{j}"),
            &text,
            &["--no-metrics"],
        );
    }
    let mux = common::start_node(
        &mut lab,
        &fleet.muxes[0],
        "mux",
        "mux1",
        &mux_text(&[1, 2]),
        &["--no-metrics"],
    );
    let stop = Arc::new(AtomicBool::new(false));
    for j in 1..=3 {
        common::line_server(&fleet.backends[j - 1], PORT, j, Arc::clone(&stop));
    }
    let status = |socket: &std::path::Path| -> Value {
        let s = request(socket, &json!({"command": "status"})).unwrap();
        assert_eq!(s["ok"], true, "{s}");
        s
    };
    let mux_mac = fleet.muxes[0].mac("m0").unwrap();
    let router_mac = fleet.router.mac("r-m1").unwrap();
    let before = status(&mux.socket);

    // The client: 30 connections before the flood, 30 more during it (one every 100 ms), each
    // asked something every 200 ms; then, once the flood is over, the new backend is added and
    // every connection is asked again.
    let flood_started = Arc::new(AtomicBool::new(false));
    let flood_done = Arc::new(AtomicBool::new(false));
    let client = fleet.client.enter({
        let (flood_started, flood_done) = (Arc::clone(&flood_started), Arc::clone(&flood_done));
        let (socket, config) = (mux.socket.clone(), mux.config.clone());
        move || {
            let mut old: Vec<Conn> = (0..CONNECTIONS).map(Conn::open).collect();
            let mut new: Vec<Conn> = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !flood_started.load(Ordering::Relaxed) {
                assert!(Instant::now() < deadline, "the flood did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(500));
            let (mut round, mut lost_during) = (0, 0);
            while !flood_done.load(Ordering::Relaxed) || new.len() < CONNECTIONS {
                assert!(
                    Instant::now() < deadline + 5 * FLOOD,
                    "the client outran its time: {round} rounds, {} opened, {lost_during} lost",
                    new.len()
                );
                if new.len() < CONNECTIONS {
                    new.push(Conn::open(CONNECTIONS + new.len()));
                }
                if round % 2 == 0 {
                    for c in old.iter_mut().chain(&mut new) {
                        lost_during += usize::from(!c.alive(&format!("during {round}")));
                    }
                }
                round += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            // The flood is over (its entries are still in the table): add backend 3.
            std::fs::write(
                &config,
                mux_text(&[1, 2, 3]).replace("SOCKET", &format!("{socket:?}")),
            )
            .unwrap();
            let answer: Value = request(&socket, &json!({"command": "reload"})).unwrap();
            assert_eq!(answer["ok"], true, "{answer}");
            std::thread::sleep(Duration::from_millis(200));
            let outcome = |conns: &mut Vec<Conn>| {
                let (mut broken, mut moved) = (0, 0);
                for (n, c) in conns.iter_mut().enumerate() {
                    broken += usize::from(!c.alive(&format!("after {n}")));
                    moved += usize::from(moves(&[1, 2, 3], c.port, &c.who));
                }
                (broken, moved)
            };
            (outcome(&mut old), outcome(&mut new), lost_during)
        }
    });

    // The flood, from the router's side of the mux's link: paced in 100 ms slices.
    let flood = fleet.router.enter({
        let (flood_started, flood_done) = (Arc::clone(&flood_started), Arc::clone(&flood_done));
        move || {
            let slices = FLOOD.as_millis() as usize / 100;
            let per_slice = PAIRS_PER_SECOND / 10;
            let mut sent = 0u64;
            let flood_start = Instant::now();
            flood_started.store(true, Ordering::Relaxed);
            for slice in 0..slices {
                let started = Instant::now();
                let frames: Vec<Vec<u8>> = (slice * per_slice..(slice + 1) * per_slice)
                    .flat_map(|n| spoofed_pair(n, mux_mac, router_mac))
                    .collect();
                let count = frames.len() as u64;
                sent += lb::blast::blast("r-m1", &frames, Duration::from_millis(100), count)
                    .unwrap()
                    .packets;
                if let Some(rest) = Duration::from_millis(100).checked_sub(started.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            flood_done.store(true, Ordering::Relaxed);
            (sent, flood_start.elapsed())
        }
    });
    let (sent, took) = flood.join().unwrap();
    let during = status(&mux.socket);
    let ((old_broken, old_moved), (new_broken, new_moved), lost_during) = client.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let frames = during["counters"]["frames"].as_u64().unwrap()
        - before["counters"]["frames"].as_u64().unwrap();
    eprintln!(
        "flood: {sent} frames sent in {took:?}, {frames} processed; conntrack after it: {}; broken by the \
         reload: {old_broken} of {CONNECTIONS} opened before ({old_moved} moved by the table), \
         {new_broken} of {CONNECTIONS} opened during the flood ({new_moved} moved)",
        during["conntrack"]
    );
    assert!(
        frames > sent / 2,
        "the flood reached the mux: {frames} of {sent}"
    );
    assert!(
        during["conntrack"]["trusted"].as_u64().unwrap() <= 2 * CONNECTIONS as u64 + 10,
        "the flood earned no trust: {}",
        during["conntrack"]
    );
    assert_eq!(lost_during, 0, "no connection broke during the flood");
    assert!(
        new_moved >= 3 && old_moved >= 3,
        "the new table moves some connections: {new_moved} opened during the flood, {old_moved} before"
    );
    assert_eq!(
        (old_broken, new_broken),
        (0, 0),
        "connections broken by the reload: {old_broken} of those opened before the flood ({old_moved} \
         moved by the table), {new_broken} of those opened during it ({new_moved} moved)"
    );
}
