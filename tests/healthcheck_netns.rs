//! `lb healthcheck` in network namespaces (root): two muxes, each with its own health-check
//! sidecar, three backends running `lb agent` (with its `/healthz` endpoint) and a real HTTP
//! server. A client sends real HTTP requests to the VIP through the router's ECMP route.
//!
//! Steps, each bounded by the checks' timing (interval 500 ms, rise 2, fall 3):
//! 1. a backend's server stops → every mux drops it within interval × fall + 1 s, the muxes'
//!    fingerprints agree, and every new request is answered by the other backends;
//! 2. it starts again → it returns within interval × rise + 1 s, with the first fingerprint;
//! 3. a backend's *agent* stops while its server runs → it leaves too (a dead agent would
//!    black-hole traffic), and returns when the agent is back;
//! 4. a mux restarts (it comes back with every backend healthy) while a backend is down → its
//!    sidecar re-sends the full state and the restarted mux drops the backend again.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb::netns::{Lab, require_root};
use lb::topology::{Fleet, FleetPlan};
use lb_dataplane::socket::request;
use serde_json::{Value, json};

const INTERVAL_MS: u64 = 500;
const RISE: u64 = 2;
const FALL: u64 = 3;
const AGENT_PORT: u16 = 9479;
const BACKENDS: usize = 3;

fn config(i: usize) -> String {
    let mut s = format!(
        "[node]\nname = \"mux{i}\"\ninterface = \"m0\"\naddress_v4 = \"{}\"\nmtu = 1600\ncontrol_socket = SOCKET\n",
        Fleet::mux_address(i)
    );
    s.push_str(&format!(
        "\n[[vip]]\nname = \"web\"\naddress = \"{}\"\nprotocol = \"tcp\"\nport = 80\nencap = \"ipip\"\n\
         [vip.check]\ntype = \"http\"\npath = \"/\"\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = 300\nrise = {RISE}\nfall = {FALL}\n",
        Fleet::VIP
    ));
    for j in 1..=BACKENDS {
        s.push_str(&format!(
            "  [[vip.backend]]\n  address = \"{}\"\n  name = \"be{j}\"\n",
            Fleet::backend_address(j)
        ));
    }
    s.push_str(&format!(
        "\n[healthcheck]\ncontrol_socket = \"HC\"\n[healthcheck.agent_check]\ntype = \"http\"\npath = \"/healthz\"\n\
         port = {AGENT_PORT}\ninterval_ms = {INTERVAL_MS}\ntimeout_ms = 300\nrise = {RISE}\nfall = {FALL}\n"
    ));
    s
}

fn agent_config(j: usize) -> String {
    format!(
        "[node]\nname = \"be{j}\"\ninterface = \"b0\"\naddress_v4 = \"{b}\"\ncontrol_socket = SOCKET\n\
         [agent]\nmuxes = [\"{}/32\", \"{}/32\"]\nhealth_address = \"{b}:{AGENT_PORT}\"\n\
         [[vip]]\nname = \"web\"\naddress = \"{}\"\nprotocol = \"tcp\"\nport = 80\nencap = \"ipip\"\n  [[vip.backend]]\n  address = \"{b}\"\n",
        Fleet::mux_address(1),
        Fleet::mux_address(2),
        Fleet::VIP,
        b = Fleet::backend_address(j),
    )
}

fn status(socket: &Path) -> Value {
    request(socket, &json!({"command": "status"}))
        .unwrap_or_else(|e| json!({"error": e.to_string()}))
}

/// Each mux's view of backend `j`: healthy?, and its table fingerprint.
fn mux_view(socket: &Path, j: usize) -> (Option<bool>, Option<String>) {
    let s = status(socket);
    let vip = &s["vips"][0];
    let address = Fleet::backend_address(j).to_string();
    let healthy = vip["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["address"] == address.as_str())
        .and_then(|b| b["healthy"].as_bool());
    (healthy, vip["fingerprint"].as_str().map(str::to_owned))
}

/// Waits until every mux has backend `j` at `healthy`; returns the time it took for each, and
/// asserts it is within `bound`.
fn wait_all(
    muxes: &[PathBuf],
    j: usize,
    healthy: bool,
    since: Instant,
    bound: Duration,
    what: &str,
    logs: &dyn Fn() -> String,
) -> Vec<Duration> {
    let mut took = vec![None; muxes.len()];
    let deadline = since + bound + Duration::from_secs(5);
    while took.iter().any(Option::is_none) {
        for (k, socket) in muxes.iter().enumerate() {
            if took[k].is_none() && mux_view(socket, j).0 == Some(healthy) {
                took[k] = Some(since.elapsed());
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: muxes did not follow: {took:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took: Vec<Duration> = took.into_iter().flatten().collect();
    eprintln!("{what}: every mux followed in {took:?} (bound {bound:?})");
    for t in &took {
        assert!(
            *t <= bound,
            "{what}: {t:?} is over the bound {bound:?}\n{}",
            logs()
        );
    }
    took
}

/// The muxes' fingerprints, asserted equal.
fn agreed_fingerprint(muxes: &[PathBuf], what: &str) -> String {
    let prints: Vec<Option<String>> = muxes.iter().map(|m| mux_view(m, 1).1).collect();
    assert!(
        prints.iter().all(|p| p.is_some() && *p == prints[0]),
        "{what}: fingerprints differ: {prints:?}"
    );
    prints[0].clone().unwrap()
}

/// `n` requests to the VIP; who answered each (all must succeed).
fn requests(fleet: &Fleet, n: usize) -> BTreeMap<String, usize> {
    let mut who = BTreeMap::new();
    for k in 0..n {
        let name = common::http_get(&fleet.client, SocketAddrV4::new(Fleet::VIP, 80).into())
            .unwrap_or_else(|e| panic!("request {k} failed: {e}"));
        *who.entry(name).or_default() += 1;
    }
    who
}

fn server(fleet: &Fleet, j: usize) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    common::http_server(
        &fleet.backends[j - 1],
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 80)),
        format!("be{j}\n"),
        Arc::clone(&stop),
    );
    stop
}

#[test]
fn dead_backends_and_dead_agents_leave_every_mux_within_the_bound_and_return() {
    require_root(
        "healthcheck_netns::dead_backends_and_dead_agents_leave_every_mux_within_the_bound_and_return",
    );
    let mut lab = Lab::new("hcheck").unwrap();
    let fleet = Fleet::build(
        &mut lab,
        &FleetPlan {
            muxes: 2,
            backends: BACKENDS,
            resilient: false,
            ipv6: false,
        },
    )
    .unwrap();
    fleet.add_backend_vips().unwrap();
    fleet.route_vip_via(&[1, 2]).unwrap();
    let mut agents = Vec::new();
    for j in 1..=BACKENDS {
        agents.push(common::start_node(
            &mut lab,
            &fleet.backends[j - 1],
            "agent",
            &format!("agent{j}"),
            &agent_config(j),
            &["--no-metrics"],
        ));
    }
    let mut servers: Vec<Arc<AtomicBool>> = (1..=BACKENDS).map(|j| server(&fleet, j)).collect();
    let mut muxes = Vec::new();
    let mut sidecars = Vec::new();
    for i in 1..=2 {
        let mux = common::start_node(
            &mut lab,
            &fleet.muxes[i - 1],
            "mux",
            &format!("mux{i}"),
            &config(i),
            &["--no-metrics"],
        );
        let sidecar_text = config(i)
            .replace("SOCKET", &format!("{:?}", mux.socket))
            .replace("\"HC\"", "SOCKET");
        sidecars.push(common::start_node(
            &mut lab,
            &fleet.muxes[i - 1],
            "healthcheck",
            &format!("hc{i}"),
            &sidecar_text,
            // Sidecar 1 serves metrics on its default address, inside mux 1's namespace.
            if i == 1 { &[] } else { &["--no-metrics"] },
        ));
        muxes.push(mux);
    }
    let mux_sockets: Vec<PathBuf> = muxes.iter().map(|m| m.socket.clone()).collect();
    let log_pids: Vec<u32> = sidecars
        .iter()
        .map(|s| s.pid)
        .chain(muxes.iter().map(|m| m.pid))
        .collect();
    let logs = |lab: &Lab| -> String {
        log_pids
            .iter()
            .map(|&p| format!("--- pid {p}\n{}", lab.log(p)))
            .collect()
    };

    // Settled: every sidecar has probed every backend and its agent, and is connected.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ready = sidecars.iter().all(|s| {
            let st = status(&s.socket);
            st["muxes"][0]["connected"] == true
                && st["backends"].as_array().is_some_and(|b| {
                    b.len() == BACKENDS
                        && b.iter().all(|p| {
                            p["healthy"] == true
                                && p["service"]["last_success"] == true
                                && p["agent"]["last_success"] == true
                        })
                })
        });
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sidecars did not settle:\n{}",
            sidecars
                .iter()
                .map(|s| status(&s.socket).to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let all_up = agreed_fingerprint(&mux_sockets, "start");
    let who = requests(&fleet, 30);
    assert_eq!(
        who.len(),
        BACKENDS,
        "every backend answers at first: {who:?}"
    );

    let fall_bound = Duration::from_millis(INTERVAL_MS * FALL) + Duration::from_secs(1);
    let rise_bound = Duration::from_millis(INTERVAL_MS * RISE) + Duration::from_secs(1);

    // 1. Backend 2's server dies.
    servers[1].store(true, Ordering::Relaxed);
    let t = Instant::now();
    wait_all(
        &mux_sockets,
        2,
        false,
        t,
        fall_bound,
        "be2 server stopped",
        &|| logs(&lab),
    );
    let without_be2 = agreed_fingerprint(&mux_sockets, "be2 down");
    assert_ne!(without_be2, all_up);
    let who = requests(&fleet, 30);
    assert!(
        !who.contains_key("be2"),
        "a new flow reached the dead backend: {who:?}"
    );
    assert_eq!(who.values().sum::<usize>(), 30);
    let shown = std::process::Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["status", "--socket"])
        .arg(&sidecars[0].socket)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown
            .lines()
            .any(|l| l.contains(&Fleet::backend_address(2).to_string())
                && l.contains("UNHEALTHY")
                && l.contains("refused")),
        "lb status shows the dead backend and why:\n{shown}"
    );

    let metrics = common::metrics_text(&fleet.muxes[0], "127.0.0.1:9478");
    let be2 = Fleet::backend_address(2);
    for expected in [
        format!("lb_healthcheck_backend_healthy{{vip=\"web\",backend=\"{be2}\"}} 0"),
        format!(
            "lb_healthcheck_backend_healthy{{vip=\"web\",backend=\"{}\"}} 1",
            Fleet::backend_address(1)
        ),
        format!("lb_healthcheck_transitions_total{{vip=\"web\",backend=\"{be2}\"}} 1"),
        "lb_healthcheck_mux_connected{".to_owned(),
        "lb_healthcheck_probe_latency_seconds{vip=\"web\"".to_owned(),
    ] {
        assert!(
            metrics.contains(&expected),
            "metrics lack {expected:?}:\n{metrics}"
        );
    }

    // 2. It comes back.
    servers[1] = server(&fleet, 2);
    let t = Instant::now();
    wait_all(
        &mux_sockets,
        2,
        true,
        t,
        rise_bound,
        "be2 server restarted",
        &|| logs(&lab),
    );
    assert_eq!(
        agreed_fingerprint(&mux_sockets, "be2 back"),
        all_up,
        "the same backends give the same table"
    );
    let who = requests(&fleet, 30);
    assert!(who.contains_key("be2"), "be2 gets new flows again: {who:?}");

    // 3. Backend 3's agent dies; its server still answers the service check.
    lab.signal(agents[2].pid, libc::SIGTERM).unwrap();
    assert!(
        lab.wait(agents[2].pid, Duration::from_secs(5)).is_some(),
        "agent 3 did not stop"
    );
    let t = Instant::now();
    wait_all(
        &mux_sockets,
        3,
        false,
        t,
        fall_bound,
        "be3 agent stopped",
        &|| logs(&lab),
    );
    agreed_fingerprint(&mux_sockets, "be3 agent down");
    let who = requests(&fleet, 30);
    assert!(
        !who.contains_key("be3"),
        "a new flow reached the backend without agent: {who:?}"
    );
    agents[2] = common::start_node(
        &mut lab,
        &fleet.backends[2],
        "agent",
        "agent3",
        &agent_config(3),
        &["--no-metrics"],
    );
    let t = Instant::now();
    wait_all(
        &mux_sockets,
        3,
        true,
        t,
        rise_bound,
        "be3 agent restarted",
        &|| logs(&lab),
    );
    assert_eq!(agreed_fingerprint(&mux_sockets, "be3 agent back"), all_up);

    // 4. Backend 1 dies, then mux 1 restarts: it starts with every backend healthy, and its
    //    sidecar re-sends the full state.
    servers[0].store(true, Ordering::Relaxed);
    wait_all(
        &mux_sockets,
        1,
        false,
        Instant::now(),
        fall_bound,
        "be1 server stopped",
        &|| logs(&lab),
    );
    let without_be1 = agreed_fingerprint(&mux_sockets, "be1 down");
    lab.signal(muxes[0].pid, libc::SIGTERM).unwrap();
    muxes[0] = common::restart_node(
        &mut lab,
        &fleet.muxes[0],
        "mux",
        "mux1",
        &muxes[0],
        &["--no-metrics"],
    );
    let t = Instant::now();
    wait_all(
        &mux_sockets[..1],
        1,
        false,
        t,
        Duration::from_secs(2),
        "mux 1 restarted, full state re-sent",
        &|| logs(&lab),
    );
    assert_eq!(
        agreed_fingerprint(&mux_sockets, "after the mux restart"),
        without_be1
    );
    let hc = status(&sidecars[0].socket);
    assert!(hc["muxes"][0]["full_syncs"].as_u64().unwrap() >= 2, "{hc}");

    // 5. Sidecar reloads: a bad file is rejected and the old config keeps checking; a good one
    //    (new timing) keeps every state, so the dead backend stays out.
    let hc_config = std::fs::read_to_string(&sidecars[0].config).unwrap();
    std::fs::write(
        &sidecars[0].config,
        hc_config.replacen("timeout_ms = 300", "timeout_ms = 900", 1),
    )
    .unwrap();
    lab.signal(sidecars[0].pid, libc::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab.log(sidecars[0].pid).contains("reload rejected") {
        assert!(
            Instant::now() < deadline,
            "bad reload not reported:\n{}",
            lab.log(sidecars[0].pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        lab.log(sidecars[0].pid).contains("vip[0].check.timeout_ms"),
        "{}",
        lab.log(sidecars[0].pid)
    );
    std::fs::write(
        &sidecars[0].config,
        hc_config.replace(&format!("interval_ms = {INTERVAL_MS}"), "interval_ms = 400"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab.log(sidecars[0].pid).contains("config reloaded") {
        assert!(
            Instant::now() < deadline,
            "file change not picked up:\n{}",
            lab.log(sidecars[0].pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let watch_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < watch_until {
        assert_eq!(
            mux_view(&mux_sockets[0], 1).0,
            Some(false),
            "the dead backend came back after a reload:\n{}\n{}\n{}",
            lab.log(sidecars[0].pid),
            lab.log(muxes[0].pid),
            status(&sidecars[0].socket)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        agreed_fingerprint(&mux_sockets, "after the reload"),
        without_be1
    );
    let hc = status(&sidecars[0].socket);
    assert_eq!(
        hc["backends"].as_array().map(Vec::len),
        Some(BACKENDS),
        "{hc}"
    );
    assert_eq!(hc["muxes"][0]["connected"], true, "{hc}");

    for s in &servers {
        s.store(true, Ordering::Relaxed);
    }
    for s in &sidecars {
        lab.signal(s.pid, libc::SIGTERM).unwrap();
        let code = lab.wait(s.pid, Duration::from_secs(5));
        assert!(
            code.is_some_and(|c| c.success()),
            "sidecar exit: {code:?}\n{}",
            lab.log(s.pid)
        );
    }
}
