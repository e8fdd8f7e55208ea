//! Daisy chaining (Beamer) in network namespaces (root): established TCP connections survive a
//! backend being added *and* their mux being replaced by one that never saw them (an ECMP
//! reshuffle), because the new backend's agent passes packets of connections it does not have
//! on to the previous backend named in the GRE key. The same run with chaining off
//! (`node.chain_window_seconds = 0`) breaks the moved connections: the test can fail.
//!
//! Within the window, floods of spoofed non-SYN segments (new 4-tuples, then the same few over
//! and over) cost the new backend's agent no more kernel lookups and relays than its budgets
//! (`agent.chain_lookups_per_second`, `agent.chain_relays_per_second`), every refusal counted,
//! while the established connections keep working and new ones open.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb::netns::{Lab, Namespace, require_root};
use lb::topology::{Fleet, FleetPlan};
use lb_dataplane::socket::request;
use serde_json::{Value, json};

const PORT: u16 = 80;
const CONNECTIONS: usize = 60;
/// The agents' chaining budgets in this test (small, so that a flood from one test thread
/// exceeds them many times over).
const LOOKUPS_PER_SECOND: u64 = 50;
const RELAYS_PER_SECOND: u64 = 400;
/// Flood rate (packets a second) and durations.
const FLOOD_RATE: u64 = 4000;
const FLOOD_NEW_TUPLES: Duration = Duration::from_millis(2000);
const FLOOD_REPEATS: Duration = Duration::from_millis(1000);

fn vip(backends: &[usize]) -> String {
    let mut s = format!(
        "\n[[vip]]\nname = \"web\"\naddress = \"{}\"\nprotocol = \"tcp\"\nport = {PORT}\nencap = \"gre\"\n",
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

fn spawn(lab: &mut Lab, ns: &Namespace, what: &str, name: &str, text: &str) -> (PathBuf, PathBuf) {
    let node = common::start_node(lab, ns, what, name, text, &["--no-metrics"]);
    (node.socket, node.config)
}

/// A spoofed TCP segment (ACK, no SYN) from the client's address and `port` to the VIP.
fn spoofed_ack(port: u16, seq: u32) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4(Fleet::CLIENT.octets(), Fleet::VIP.octets(), 64)
        .tcp(port, PORT, seq, 1000)
        .ack(seq.wrapping_mul(7))
        .write(&mut out, b"spoofed")
        .unwrap();
    out
}

/// Sends spoofed ACKs to the VIP from the calling thread (in the client's namespace) at
/// [`FLOOD_RATE`] for `duration`, the n-th from `port(n)`. Returns how many.
fn flood(duration: Duration, port: impl Fn(u64) -> u16) -> u64 {
    use lb_dataplane::device::Transmitter;
    let mut tx = lb_dataplane::rawip::RawIpTransmitter::open(64).unwrap();
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < duration {
        for _ in 0..20 {
            let packet = spoofed_ack(port(sent), sent as u32);
            tx.queue(&packet, Fleet::VIP.into()).unwrap();
            sent += 1;
        }
        tx.flush().unwrap();
        // Paced: `sent` packets by now at FLOOD_RATE.
        let due = Duration::from_micros(sent * 1_000_000 / FLOOD_RATE);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    sent
}

/// The counters of an agent.
fn counters(socket: &std::path::Path) -> Value {
    request(socket, &json!({"command": "status"})).unwrap()["counters"].clone()
}

/// How much a counter grew between two [`counters`].
fn grew(before: &Value, after: &Value, key: &str) -> u64 {
    after[key].as_u64().unwrap() - before[key].as_u64().unwrap()
}

/// What the floods cost the new backend's agent (be3), and what legitimate traffic saw.
#[derive(Debug, Default)]
struct FloodReport {
    /// Spoofed packets sent: new 4-tuples, then repeated ones.
    sent: (u64, u64),
    /// Durations of the two floods, as measured around their counter snapshots.
    seconds: (f64, f64),
    /// be3's counters: before the first flood, between the floods, after the second.
    counters: Vec<Value>,
    /// Exchanges on established connections around and during the first flood that failed,
    /// and how many there were.
    broken_during: (usize, usize),
    /// New connections opened (one exchange each) during the floods that failed, of how many.
    new_failed: (usize, usize),
}

/// One exchange on an established connection: true if its backend answered.
fn exchange(r: &mut BufReader<TcpStream>, w: &mut TcpStream, who: &str, text: &str) -> bool {
    let mut line = String::new();
    writeln!(w, "{text}").is_ok()
        && r.read_line(&mut line).is_ok_and(|k| k > 0)
        && line.starts_with(who)
}

/// A new connection to the VIP with one exchange: true if it worked.
fn new_connection(n: usize) -> bool {
    let Ok(c) = TcpStream::connect_timeout(
        &SocketAddrV4::new(Fleet::VIP, PORT).into(),
        Duration::from_secs(3),
    ) else {
        return false;
    };
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut w = c.try_clone().unwrap();
    let mut r = BufReader::new(c);
    let mut line = String::new();
    writeln!(w, "new {n}").is_ok()
        && r.read_line(&mut line).is_ok_and(|k| k > 0)
        && line.trim().ends_with(&format!("new {n}"))
}

/// Runs the scenario; returns (connections broken, connections whose backend changed) and,
/// with a window, what the spoofed floods within it did.
fn scenario(chain_window_seconds: u32) -> (usize, usize, Option<FloodReport>) {
    let mut lab = Lab::new(if chain_window_seconds > 0 {
        "chainon"
    } else {
        "chainoff"
    })
    .unwrap();
    let fleet = Fleet::build(
        &mut lab,
        &FleetPlan {
            muxes: 2,
            backends: 3,
            resilient: false,
            ipv6: false,
        },
    )
    .unwrap();
    fleet.add_backend_vips().unwrap();
    let muxes = format!(
        "[\"{}/32\", \"{}/32\"]",
        Fleet::mux_address(1),
        Fleet::mux_address(2)
    );
    // Backends 1 and 2 start knowing only each other; they learn of backend 3 by a reload
    // (their agents watch the file), as an operator adding a backend would do it.
    let agent_text = |j: usize, backends: &[usize]| {
        format!(
            "[node]\nname = \"be{j}\"\ninterface = \"b0\"\naddress_v4 = \"{}\"\ncontrol_socket = SOCKET\n\
             [agent]\nmuxes = {muxes}\nchain_lookups_per_second = {LOOKUPS_PER_SECOND}\n\
             chain_relays_per_second = {RELAYS_PER_SECOND}\n{}",
            Fleet::backend_address(j),
            vip(backends)
        )
    };
    let mut agent_configs = Vec::new();
    for j in 1..=3 {
        let text = agent_text(j, if j == 3 { &[1, 2, 3] } else { &[1, 2] });
        let (socket, config) = spawn(
            &mut lab,
            &fleet.backends[j - 1],
            "agent",
            &format!("agent{j}"),
            &text,
        );
        agent_configs.push((socket, config, agent_text(j, &[1, 2, 3])));
    }
    let mux_text = |i: usize, backends: &[usize]| {
        format!(
            "[node]\nname = \"mux{i}\"\ninterface = \"m0\"\naddress_v4 = \"{}\"\nmtu = 1600\n\
             chain_window_seconds = {chain_window_seconds}\ncontrol_socket = SOCKET\n{}",
            Fleet::mux_address(i),
            vip(backends)
        )
    };
    let mut mux_sockets = Vec::new();
    for i in 1..=2 {
        let (socket, config) = spawn(
            &mut lab,
            &fleet.muxes[i - 1],
            "mux",
            &format!("mux{i}"),
            &mux_text(i, &[1, 2]),
        );
        mux_sockets.push((socket, config));
    }
    let stop = Arc::new(AtomicBool::new(false));
    for j in 1..=3 {
        common::line_server(&fleet.backends[j - 1], PORT, j, Arc::clone(&stop));
    }
    // Backend 3 is announced to the agents of 1 and 2 (file change, no restart).
    for (socket, config, text) in &agent_configs[..2] {
        std::fs::write(config, text.replace("SOCKET", &format!("{socket:?}"))).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    // Everything through mux 1: open the connections, one exchange each.
    fleet.route_vip_via(&[1]).unwrap();
    let outcome = fleet
        .client
        .enter({
            let be3 = agent_configs[2].0.clone();
            let sockets = mux_sockets.clone();
            let text: Vec<String> = (1..=2).map(|i| mux_text(i, &[1, 2, 3])).collect();
            let router = fleet.router.clone();
            move || {
                let mut conns: Vec<(BufReader<TcpStream>, TcpStream, String)> = Vec::new();
                for n in 0..CONNECTIONS {
                    let c = TcpStream::connect_timeout(
                        &SocketAddrV4::new(Fleet::VIP, PORT).into(),
                        Duration::from_secs(5),
                    )
                    .unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    let mut w = c.try_clone().unwrap();
                    let mut r = BufReader::new(c);
                    writeln!(w, "{n}").unwrap();
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    let who = line.split(' ').next().unwrap().to_owned();
                    conns.push((r, w, who));
                }
                // Backend 3 joins on both muxes; then the router moves every flow to mux 2,
                // which has no connection-table entry for any of them.
                for (i, (socket, config)) in sockets.iter().enumerate() {
                    std::fs::write(config, text[i].replace("SOCKET", &format!("{socket:?}")))
                        .unwrap();
                    let answer: Value = request(socket, &json!({"command": "reload"})).unwrap();
                    assert_eq!(answer["ok"], true, "{answer}");
                }
                let hops = format!("{}", Fleet::mux_address(2));
                router
                    .ip(&[
                        "route",
                        "replace",
                        &format!("{}/32", Fleet::VIP),
                        "via",
                        &hops,
                        "dev",
                        "r-m2",
                    ])
                    .unwrap();
                let (mut broken, mut moved) = (0, 0);
                for (n, (r, w, who)) in conns.iter_mut().enumerate() {
                    let mut line = String::new();
                    let ok = writeln!(w, "again {n}").is_ok()
                        && r.read_line(&mut line).is_ok_and(|k| k > 0)
                        && line.starts_with(who.as_str());
                    if !ok {
                        broken += 1;
                    }
                    let flow_moves = {
                        // Whether the new table sends this flow elsewhere: the answer
                        // still comes from `who` when chaining works, so ask the table.
                        let local = r.get_ref().local_addr().unwrap();
                        let key = lb_core::flow::FlowKey::new(
                            local.ip(),
                            std::net::IpAddr::V4(Fleet::VIP),
                            lb_core::flow::PROTO_TCP,
                            local.port(),
                            PORT,
                        )
                        .unwrap();
                        let config = lb_core::config::Config::from_toml(
                            &text[1].replace("SOCKET", "\"/x\""),
                            "t",
                        )
                        .unwrap();
                        let table = config.vips[0].table().unwrap();
                        table.lookup_backend(key.hash()).unwrap().id.0.to_string()
                            != match who.as_str() {
                                "be1" => Fleet::backend_address(1).to_string(),
                                "be2" => Fleet::backend_address(2).to_string(),
                                _ => Fleet::backend_address(3).to_string(),
                            }
                    };
                    if flow_moves {
                        moved += 1;
                    }
                }
                let report = (chain_window_seconds > 0).then(|| {
                    let mut report = FloodReport::default();
                    // Flood 1, new 4-tuples (ports counting up from 1024): the established
                    // connections exchange every 400 ms meanwhile, and new ones open.
                    for (n, (r, w, who)) in conns.iter_mut().enumerate() {
                        report.broken_during.1 += 1;
                        if !exchange(r, w, who, &format!("warm {n}")) {
                            report.broken_during.0 += 1;
                        }
                    }
                    report.counters.push(counters(&be3));
                    let started = Instant::now();
                    let flooder = std::thread::spawn(|| {
                        flood(FLOOD_NEW_TUPLES, |n| 1024 + (n % 30_000) as u16)
                    });
                    let mut round = 0;
                    while !flooder.is_finished() {
                        std::thread::sleep(Duration::from_millis(400));
                        round += 1;
                        for (n, (r, w, who)) in conns.iter_mut().enumerate() {
                            report.broken_during.1 += 1;
                            if !exchange(r, w, who, &format!("flood {round} {n}")) {
                                report.broken_during.0 += 1;
                            }
                        }
                        for k in 0..5 {
                            report.new_failed.1 += 1;
                            if !new_connection(round * 10 + k) {
                                report.new_failed.0 += 1;
                            }
                        }
                    }
                    report.sent.0 = flooder.join().unwrap();
                    report.counters.push(counters(&be3));
                    report.seconds.0 = started.elapsed().as_secs_f64();
                    // Flood 2: the same 100 4-tuples over and over. New connections open.
                    let started = Instant::now();
                    let flooder =
                        std::thread::spawn(|| flood(FLOOD_REPEATS, |n| 31_000 + (n % 100) as u16));
                    let mut k = 1000;
                    while !flooder.is_finished() {
                        report.new_failed.1 += 1;
                        if !new_connection(k) {
                            report.new_failed.0 += 1;
                        }
                        k += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    report.sent.1 = flooder.join().unwrap();
                    report.counters.push(counters(&be3));
                    report.seconds.1 = started.elapsed().as_secs_f64();
                    // The established connections still work.
                    for (n, (r, w, who)) in conns.iter_mut().enumerate() {
                        if !exchange(r, w, who, &format!("after {n}")) {
                            broken += 1;
                        }
                    }
                    report
                });
                (broken, moved, report)
            }
        })
        .join()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    outcome
}

#[test]
fn connections_survive_a_backend_added_and_a_mux_change_only_with_chaining() {
    require_root(
        "chain_netns::connections_survive_a_backend_added_and_a_mux_change_only_with_chaining",
    );
    let (broken, moved, report) = scenario(30);
    assert!(
        moved >= 5,
        "the new table moves some connections to be3: {moved}"
    );
    assert_eq!(
        broken, 0,
        "with daisy chaining no connection breaks ({moved} moved)"
    );
    let report = report.unwrap();
    eprintln!("{report:#?}");
    let [before, between, after] = &report.counters[..] else {
        panic!("{report:?}")
    };
    // Flood 1 (new 4-tuples): lookups within the budget, the rest refused and counted; the
    // established connections and new ones unaffected.
    let lookups = grew(before, between, "connection_lookups");
    let budget = LOOKUPS_PER_SECOND as f64 * (report.seconds.0 + 1.0);
    assert!(
        (lookups as f64) <= budget,
        "{lookups} lookups in {:.1} s: {report:#?}",
        report.seconds.0
    );
    let refused = grew(before, between, "rejected_lookup_budget");
    assert!(
        refused > 5 * lookups,
        "most spoofed segments were refused a lookup: {report:#?}"
    );
    assert_eq!(
        report.broken_during.0, 0,
        "established connections during the flood: {report:#?}"
    );
    assert_eq!(report.new_failed.0, 0, "new connections: {report:#?}");
    // Flood 2 (repeated 4-tuples): answered from the cache, relays within the budget, the rest
    // refused and counted.
    let relays = grew(between, after, "chained");
    let budget = RELAYS_PER_SECOND as f64 * (report.seconds.1 + 1.0);
    assert!(
        (relays as f64) <= budget,
        "{relays} relays in {:.1} s: {report:#?}",
        report.seconds.1
    );
    assert!(
        grew(between, after, "rejected_relay_budget") > 0,
        "{report:#?}"
    );
    assert!(
        grew(between, after, "connection_lookups") <= 100 + LOOKUPS_PER_SECOND,
        "repeated tuples are looked up about once each: {report:#?}"
    );
    assert!(
        grew(between, after, "connection_cache_hits") > relays,
        "{report:#?}"
    );
    let (broken_off, moved_off, _) = scenario(0);

    assert!(moved_off >= 5);
    assert!(
        broken_off >= moved_off / 2,
        "without chaining the moved connections break: {broken_off} of {moved_off}"
    );
}
