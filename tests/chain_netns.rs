//! Daisy chaining (Beamer) in network namespaces (root): established TCP connections survive a
//! backend being added *and* their mux being replaced by one that never saw them (an ECMP
//! reshuffle), because the new backend's agent passes packets of connections it does not have
//! on to the previous backend named in the GRE key. The same run with chaining off
//! (`node.chain_window_seconds = 0`) breaks the moved connections: the test can fail.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lb::netns::{Lab, Namespace, require_root};
use lb::topology::{Fleet, FleetPlan};
use lb_dataplane::socket::request;
use serde_json::{Value, json};

const PORT: u16 = 80;
const CONNECTIONS: usize = 60;

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

/// Runs the scenario; returns (connections broken, connections whose backend changed).
fn scenario(chain_window_seconds: u32) -> (usize, usize) {
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
             [agent]\nmuxes = {muxes}\n{}",
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
                (broken, moved)
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
    let (broken, moved) = scenario(30);
    assert!(
        moved >= 5,
        "the new table moves some connections to be3: {moved}"
    );
    assert_eq!(
        broken, 0,
        "with daisy chaining no connection breaks ({moved} moved)"
    );
    let (broken_off, moved_off) = scenario(0);
    assert!(moved_off >= 5);
    assert!(
        broken_off >= moved_off / 2,
        "without chaining the moved connections break: {broken_off} of {moved_off}"
    );
}
