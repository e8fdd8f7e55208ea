//! BGP driven by the health-check sidecar, in namespaces (root): BIRD 2 as the router in front
//! of two muxes (`lb::bird_lab`), and on each mux node `lb mux`, a BIRD speaker whose VIP
//! protocol starts disabled, and `lb healthcheck` driving that speaker through birdc.
//!
//! - Once both sidecars find their node healthy, the router has one ECMP route over both muxes.
//! - `lb mux` on mux 1 stops (SIGTERM) → its sidecar withdraws, and the router's route loses
//!   mux 1 within 2 s; started again → the route has both muxes again within 2 s.
//! - The same with SIGKILL on mux 2 (a crash: the socket file stays, nobody answers).
//! - The VIP's only backend stops serving → both sidecars withdraw (no VIP has a healthy
//!   backend) and the router has no route; it serves again → both announce.
//! - A sidecar stopped with SIGTERM withdraws before exiting.
//! - The BGP sessions stay established throughout (no flap), and no mux kernel gets the VIP.
//!
//! Needs root (fails with `require_root`'s message otherwise) and bird2.

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
fn sessions(router: &Bird, speakers: &[Bird]) -> Vec<(String, Protocol)> {
    let mut all = Vec::new();
    for i in 1..=speakers.len() {
        let name = router_session(i);
        all.push(("router".to_owned(), router.protocol(&name).unwrap()));
    }
    for (k, speaker) in speakers.iter().enumerate() {
        let p = speaker.protocol(SPEAKER_SESSION).unwrap();
        all.push((format!("mux{}", k + 1), p));
    }
    all
}

fn mux_config(i: usize, bird: &Bird) -> String {
    format!(
        "[node]\nname = \"mux{i}\"\ninterface = \"m0\"\naddress_v4 = \"{mux}\"\nmtu = 1600\ncontrol_socket = SOCKET\n\
         [[vip]]\nname = \"web\"\naddress = \"{vip}\"\nprotocol = \"tcp\"\nport = 80\nencap = \"ipip\"\n\
         [vip.check]\ntype = \"tcp\"\ninterval_ms = 300\ntimeout_ms = 200\nrise = 2\nfall = 3\n\
         [[vip.backend]]\naddress = \"{backend}\"\n\
         [healthcheck]\ncontrol_socket = \"HC\"\n\
         [healthcheck.bgp]\nspeaker = \"bird\"\nbird_socket = {socket:?}\nbird_protocols = {{ \"{vip}\" = \"{VIP_PROTOCOL}\" }}\n",
        mux = Fleet::mux_address(i),
        vip = Fleet::VIP,
        backend = Fleet::backend_address(1),
        socket = bird.socket,
    )
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
    let speakers: Vec<Bird> = (1..=2)
        .map(|i| bird_lab::start_speaker(&mut lab, &fleet, i, false).expect("speaker BIRD"))
        .collect();
    let mut muxes = Vec::new();
    let mut sidecars = Vec::new();
    for i in 1..=2 {
        let text = mux_config(i, &speakers[i - 1]);
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
        sidecars.push(common::start_node(
            &mut lab,
            &fleet.muxes[i - 1],
            "healthcheck",
            &format!("hc{i}"),
            &sidecar_text,
            &["--no-metrics"],
        ));
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
    let before = sessions(&router, &speakers);
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
    let text = std::fs::read_to_string(&muxes[0].config).unwrap();
    let restart = text.replace(&format!("{:?}", muxes[0].socket), "SOCKET");
    assert!(
        lab.wait(muxes[0].pid, Duration::from_secs(5)).is_some(),
        "mux 1 did not exit"
    );
    muxes[0] = common::start_node(
        &mut lab,
        &fleet.muxes[0],
        "mux",
        "mux1",
        &restart,
        &["--no-metrics"],
    );
    expect(&lab, &[mux1, mux2], CONVERGE, "mux 1 started again");

    // lb mux on mux 2 crashes (SIGKILL: its socket file stays).
    lab.signal(muxes[1].pid, libc::SIGKILL).unwrap();
    expect(&lab, &[mux1], CONVERGE, "mux 2 killed (SIGKILL)");
    let text = std::fs::read_to_string(&muxes[1].config).unwrap();
    let restart = text.replace(&format!("{:?}", muxes[1].socket), "SOCKET");
    assert!(
        lab.wait(muxes[1].pid, Duration::from_secs(5)).is_some(),
        "mux 2 did not exit"
    );
    muxes[1] = common::start_node(
        &mut lab,
        &fleet.muxes[1],
        "mux",
        "mux2",
        &restart,
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

    // A sidecar stopping withdraws first.
    lab.signal(sidecars[1].pid, libc::SIGTERM).unwrap();
    expect(&lab, &[mux1], CONVERGE, "sidecar 2 stopped (SIGTERM)");
    let code = lab.wait(sidecars[1].pid, Duration::from_secs(5));
    assert!(
        code.is_some_and(|c| c.success()),
        "sidecar exit {code:?}\n{}",
        lab.log(sidecars[1].pid)
    );

    assert_eq!(
        sessions(&router, &speakers),
        before,
        "a BGP session changed state\n{}",
        diagnostics(&lab)
    );
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
