//! BGP driven by the health-check sidecar, in namespaces (root): BIRD 2 as the router in front
//! of two muxes (`lb::bird_lab`), and on each mux node `lb mux` and `lb healthcheck`. Mux 1's
//! sidecar drives a BIRD speaker whose VIP protocol starts disabled (through birdc); mux 2's
//! sidecar is the API process of a real ExaBGP (announce/withdraw lines on its stdout).
//!
//! - Once both sidecars find their node healthy, the router has one ECMP route over both muxes.
//! - `lb mux` on mux 1 stops (SIGTERM) → its sidecar withdraws, and the router's route loses
//!   mux 1 within 2 s; started again → the route has both muxes again within 2 s.
//! - The same with SIGKILL on mux 2 (a crash: the socket file stays, nobody answers).
//! - The VIP's only backend stops serving → both sidecars withdraw (no VIP has a healthy
//!   backend) and the router has no route; it serves again → both announce.
//! - A sidecar stopped with SIGTERM withdraws before exiting.
//! - The BGP sessions stay established throughout (no flap), and no mux kernel gets the VIP.
//! - ExaBGP killed (SIGKILL) takes its sidecar along: the sidecar sees its pipe close and exits.
//!
//! Needs root (fails with `require_root`'s message otherwise), bird2 and exabgp.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lb::bird_lab::{
    self, Bird, Protocol, SPEAKER_SESSION, VIP_PROTOCOL, router_session, wait_for_nexthops,
};
use lb::netns::{Lab, require_root};
use lb::topology::{Fleet, FleetPlan};

/// Longest a withdrawal or an announcement may take to reach the router's kernel.
const CONVERGE: Duration = Duration::from_secs(2);
/// The backend check: interval 300 ms, fall 3.
const FALL_BOUND: Duration = Duration::from_millis(300 * 3 + 1000);

/// BGP sessions of every BIRD, as `show protocols` shows them: (which BIRD, protocol line).
fn sessions(router: &Bird, muxes: usize, speakers: &[Bird]) -> Vec<(String, Protocol)> {
    let mut all = Vec::new();
    for i in 1..=muxes {
        let name = router_session(i);
        all.push(("router".to_owned(), router.protocol(&name).unwrap()));
    }
    for (k, speaker) in speakers.iter().enumerate() {
        let p = speaker.protocol(SPEAKER_SESSION).unwrap();
        all.push((format!("mux{}", k + 1), p));
    }
    all
}

/// Milliseconds of the day of BIRD's `Since` column (`HH:MM:SS.mmm`).
fn since_ms(since: &str) -> Option<u64> {
    let (hms, ms) = since.split_once('.')?;
    let mut parts = hms.split(':').map(str::parse::<u64>);
    let (h, m, s) = (
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    );
    Some(((h * 60 + m) * 60 + s) * 1000 + ms.parse::<u64>().ok()?)
}

/// The same sessions in the same state since the same moment. BIRD derives `Since` from its
/// monotonic clock at display time, so it may move by a millisecond between two readings; a
/// flap (a new session after at least the 1 s connect delay) moves it by far more.
fn no_flap(before: &[(String, Protocol)], after: &[(String, Protocol)]) -> bool {
    before.len() == after.len()
        && before.iter().zip(after).all(|((wa, a), (wb, b))| {
            let moved = since_ms(&a.since)
                .zip(since_ms(&b.since))
                .map(|(x, y)| x.abs_diff(y));
            wa == wb
                && (&a.name, &a.state, &a.info) == (&b.name, &b.state, &b.info)
                && moved.is_some_and(|d| d <= 50)
        })
}

/// Mux `i`'s config; its sidecar speaks BGP through `bird` (BIRD) or, if `None`, as ExaBGP's
/// API process.
fn mux_config(i: usize, bird: Option<&Bird>) -> String {
    let bgp = match bird {
        Some(bird) => format!(
            "speaker = \"bird\"\nbird_socket = {:?}\nbird_protocols = {{ \"{}\" = \"{VIP_PROTOCOL}\" }}\n",
            bird.socket,
            Fleet::VIP
        ),
        None => "speaker = \"exabgp\"\n".to_owned(),
    };
    format!(
        "[node]\nname = \"mux{i}\"\ninterface = \"m0\"\naddress_v4 = \"{mux}\"\nmtu = 1600\ncontrol_socket = SOCKET\n\
         [[vip]]\nname = \"web\"\naddress = \"{vip}\"\nprotocol = \"tcp\"\nport = 80\nencap = \"ipip\"\n\
         [vip.check]\ntype = \"tcp\"\ninterval_ms = 300\ntimeout_ms = 200\nrise = 2\nfall = 3\n\
         [[vip.backend]]\naddress = \"{backend}\"\n\
         [healthcheck]\ncontrol_socket = \"HC\"\n\
         [healthcheck.bgp]\n{bgp}",
        mux = Fleet::mux_address(i),
        vip = Fleet::VIP,
        backend = Fleet::backend_address(1),
    )
}

/// Starts ExaBGP in mux `i`'s namespace with `lb healthcheck --config sidecar_config` as its
/// API process (the sidecar's stdout is ExaBGP's command channel); returns ExaBGP's pid once
/// the sidecar's control socket answers.
fn start_exabgp(
    lab: &mut Lab,
    fleet: &Fleet,
    i: usize,
    sidecar_config: &std::path::Path,
    sidecar_socket: &std::path::Path,
) -> u32 {
    let config = lab.log_dir().join(format!("exabgp-mux{i}.conf"));
    std::fs::write(
        &config,
        format!(
            "process healthcheck {{\n  run {lb} healthcheck --config {sidecar} --no-metrics;\n  encoder text;\n}}\n\
             neighbor {router} {{\n  router-id {mux};\n  local-address {mux};\n  local-as {mux_as};\n  peer-as {router_as};\n  \
             hold-time 6;\n  family {{ ipv4 unicast; }}\n  api {{ processes [ healthcheck ]; }}\n}}\n",
            lb = env!("CARGO_BIN_EXE_lb"),
            sidecar = sidecar_config.display(),
            router = Fleet::router_mux_side(i),
            mux = Fleet::mux_address(i),
            mux_as = bird_lab::MUX_AS,
            router_as = bird_lab::ROUTER_AS,
        ),
    )
    .unwrap();
    let pid = lab
        .spawn(
            fleet.mux(i),
            std::process::Command::new("exabgp")
                .arg(&config)
                .env("exabgp.daemon.user", "root")
                .env("exabgp.daemon.drop", "false")
                .env("exabgp.api.cli", "false")
                .env("exabgp.log.destination", "stdout")
                .env("exabgp.tcp.bind", "")
                .env("RUST_LOG", "info"),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lb_dataplane::socket::request(sidecar_socket, &serde_json::json!({"command": "status"}))
        .is_err()
    {
        assert!(
            Instant::now() < deadline && lab.wait(pid, Duration::ZERO).is_none(),
            "ExaBGP with the sidecar did not start:\n{}",
            lab.log(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    pid
}

#[test]
fn the_sidecar_withdraws_a_dead_mux_and_a_vip_without_backends_and_announces_them_again() {
    require_root(
        "bgp_netns::the_sidecar_withdraws_a_dead_mux_and_a_vip_without_backends_and_announces_them_again",
    );
    let mut lab = Lab::new("bgp").expect("lab");
    let fleet = Fleet::build(
        &mut lab,
        &FleetPlan {
            muxes: 2,
            backends: 1,
            resilient: false,
            ipv6: false,
        },
    )
    .expect("fleet builds");
    let stop_server = Arc::new(AtomicBool::new(false));
    common::http_server(
        &fleet.backends[0],
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 80)),
        "be1\n".into(),
        Arc::clone(&stop_server),
    );
    let router = bird_lab::start_router(&mut lab, &fleet, &[1, 2]).expect("router BIRD");
    // Mux 1 speaks through BIRD, mux 2 through ExaBGP (the sidecar is its API process).
    let speakers = vec![bird_lab::start_speaker(&mut lab, &fleet, 1, false).expect("speaker BIRD")];
    let mut muxes = Vec::new();
    let mut sidecars = Vec::new();
    for i in 1..=2 {
        let text = mux_config(i, speakers.get(i - 1));
        let mux = common::start_node(
            &mut lab,
            &fleet.muxes[i - 1],
            "mux",
            &format!("mux{i}"),
            &text,
            &["--no-metrics"],
        );
        let sidecar_text = text
            .replace("SOCKET", &format!("{:?}", mux.socket))
            .replace("\"HC\"", "SOCKET");
        if i == 1 {
            sidecars.push(common::start_node(
                &mut lab,
                &fleet.muxes[0],
                "healthcheck",
                "hc1",
                &sidecar_text,
                &["--no-metrics"],
            ));
        } else {
            let socket = lab.log_dir().join("hc2.sock");
            let config = lab.log_dir().join("hc2.toml");
            std::fs::write(
                &config,
                sidecar_text.replace("SOCKET", &format!("{socket:?}")),
            )
            .unwrap();
            let pid = start_exabgp(&mut lab, &fleet, 2, &config, &socket);
            sidecars.push(common::Node {
                pid,
                socket,
                config,
            });
        }
        muxes.push(mux);
    }
    let pids: Vec<u32> = sidecars.iter().map(|s| s.pid).collect();
    let diagnostics = |lab: &Lab| -> String {
        let mut all: Vec<String> = std::iter::once(&router)
            .chain(&speakers)
            .map(|b| b.diagnostics(lab))
            .collect();
        all.extend(
            pids.iter()
                .map(|&p| format!("--- sidecar {p}\n{}", lab.log(p))),
        );
        all.join("\n")
    };
    let (mux1, mux2) = (Fleet::mux_address(1), Fleet::mux_address(2));
    let expect = |lab: &Lab, hops: &[Ipv4Addr], within: Duration, what: &str| -> Duration {
        let took = wait_for_nexthops(&fleet.router, hops, within)
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", diagnostics(lab)));
        eprintln!("{what}: router VIP via {hops:?} after {took:?}");
        took
    };

    expect(
        &lab,
        &[mux1, mux2],
        Duration::from_secs(30),
        "both sidecars find their node healthy",
    );
    let before = sessions(&router, 2, &speakers);
    for (who, p) in &before {
        assert_eq!(
            (p.state.as_str(), p.info.as_str()),
            ("up", "Established"),
            "{who}: {p:?}"
        );
    }
    let hc = lb_dataplane::socket::request(
        &sidecars[0].socket,
        &serde_json::json!({"command": "status"}),
    )
    .unwrap();
    assert_eq!(hc["bgp"]["addresses"][0]["announced"], true, "{hc}");
    assert_eq!(hc["bgp"]["node_healthy"], true, "{hc}");

    // lb mux on mux 1 stops: withdrawn within 2 s; back when it runs again.
    lab.signal(muxes[0].pid, libc::SIGTERM).unwrap();
    expect(&lab, &[mux2], CONVERGE, "mux 1 stopped (SIGTERM)");
    muxes[0] = common::restart_node(
        &mut lab,
        &fleet.muxes[0],
        "mux",
        "mux1",
        &muxes[0],
        &["--no-metrics"],
    );
    expect(&lab, &[mux1, mux2], CONVERGE, "mux 1 started again");

    // lb mux on mux 2 crashes (SIGKILL: its socket file stays).
    lab.signal(muxes[1].pid, libc::SIGKILL).unwrap();
    expect(&lab, &[mux1], CONVERGE, "mux 2 killed (SIGKILL)");
    muxes[1] = common::restart_node(
        &mut lab,
        &fleet.muxes[1],
        "mux",
        "mux2",
        &muxes[1],
        &["--no-metrics"],
    );
    expect(&lab, &[mux1, mux2], CONVERGE, "mux 2 started again");

    // The VIP's only backend stops serving: no mux may announce it.
    stop_server.store(true, Ordering::Relaxed);
    expect(&lab, &[], FALL_BOUND + CONVERGE, "the only backend stopped");
    let stop_server = Arc::new(AtomicBool::new(false));
    common::http_server(
        &fleet.backends[0],
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 80)),
        "be1\n".into(),
        Arc::clone(&stop_server),
    );
    expect(
        &lab,
        &[mux1, mux2],
        FALL_BOUND + CONVERGE,
        "the backend serves again",
    );

    // A sidecar stopping withdraws first (BIRD's), and ExaBGP stopping takes its sidecar along.
    lab.signal(sidecars[0].pid, libc::SIGTERM).unwrap();
    expect(&lab, &[mux2], CONVERGE, "sidecar 1 stopped (SIGTERM)");
    let code = lab.wait(sidecars[0].pid, Duration::from_secs(5));
    assert!(
        code.is_some_and(|c| c.success()),
        "sidecar exit {code:?}\n{}",
        lab.log(sidecars[0].pid)
    );
    let after = sessions(&router, 2, &speakers);
    assert!(
        no_flap(&before, &after),
        "a BGP session changed state before ExaBGP stopped:\n{before:?}\n{after:?}\n{}",
        diagnostics(&lab)
    );
    // SIGKILL: ExaBGP cannot stop its API process; the sidecar must notice its pipe closing.
    lab.signal(sidecars[1].pid, libc::SIGKILL).unwrap();
    expect(
        &lab,
        &[],
        Duration::from_secs(10),
        "ExaBGP killed (the session closes)",
    );
    assert!(
        lab.wait(sidecars[1].pid, Duration::from_secs(10)).is_some(),
        "ExaBGP did not exit:\n{}",
        lab.log(sidecars[1].pid)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::exists(&sidecars[1].socket).unwrap_or(false) {
        assert!(
            Instant::now() < deadline,
            "sidecar 2 outlived ExaBGP:\n{}",
            lab.log(sidecars[1].pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    for (i, mux) in fleet.muxes.iter().enumerate() {
        let route = mux
            .ip(&["-4", "route", "show", &format!("{}/32", Fleet::VIP)])
            .unwrap();
        assert!(
            route.trim().is_empty(),
            "mux{} has a VIP route: {route}",
            i + 1
        );
    }
    stop_server.store(true, Ordering::Relaxed);
}
