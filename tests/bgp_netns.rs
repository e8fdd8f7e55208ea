//! BGP in the lab (`lb::bird_lab`), as root: BIRD 2 as the router in front of two muxes, a
//! BIRD speaker in each mux, and no static VIP route.
//!
//! - The router learns the VIP from both speakers and installs one ECMP route over both muxes.
//! - `birdc disable vip4` on mux 1's speaker (what the health-check sidecar will run) takes mux
//!   1 out of the router's route within 2 s; `birdc enable vip4` puts it back within 2 s.
//! - The BGP sessions stay established throughout (on both sides, no flap), and the speakers
//!   never put the VIP into a mux's kernel.
//!
//! Needs root (fails with `require_root`'s message otherwise) and bird2.

use std::time::{Duration, Instant};

use lb::bird_lab::{
    self, Bird, Protocol, SPEAKER_SESSION, VIP_PROTOCOL, router_session, wait_for_nexthops,
};
use lb::netns::{Lab, require_root};
use lb::topology::{Fleet, FleetPlan};

/// Longest a withdrawal or an announcement may take to reach the router's kernel.
const CONVERGE: Duration = Duration::from_secs(2);

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

fn diagnostics(lab: &Lab, router: &Bird, speakers: &[Bird]) -> String {
    std::iter::once(router)
        .chain(speakers)
        .map(|b| b.diagnostics(lab))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn disabling_the_vip_protocol_withdraws_one_mux_and_enabling_restores_ecmp() {
    require_root(
        "bgp_netns::disabling_the_vip_protocol_withdraws_one_mux_and_enabling_restores_ecmp",
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
    let router = bird_lab::start_router(&mut lab, &fleet, &[1, 2]).expect("router BIRD");
    let speakers: Vec<Bird> = (1..=2)
        .map(|i| bird_lab::start_speaker(&mut lab, &fleet, i).expect("speaker BIRD"))
        .collect();
    let fail = |e: std::io::Error| -> ! {
        panic!("{e}\n{}", diagnostics(&lab, &router, &speakers));
    };
    let (mux1, mux2) = (Fleet::mux_address(1), Fleet::mux_address(2));

    let up = wait_for_nexthops(&fleet.router, &[mux1, mux2], Duration::from_secs(30))
        .unwrap_or_else(|e| fail(e));
    eprintln!("router: VIP via both muxes (ECMP) {up:?} after the speakers started");
    let before = sessions(&router, &speakers);
    for (who, p) in &before {
        assert_eq!(
            (p.state.as_str(), p.info.as_str()),
            ("up", "Established"),
            "{who}: {p:?}\n{}",
            diagnostics(&lab, &router, &speakers)
        );
    }

    let t = Instant::now();
    speakers[0]
        .birdc(&["disable", VIP_PROTOCOL])
        .unwrap_or_else(|e| fail(e));
    wait_for_nexthops(&fleet.router, &[mux2], CONVERGE).unwrap_or_else(|e| fail(e));
    let withdrawn = t.elapsed();
    eprintln!("disable {VIP_PROTOCOL} on mux1: router dropped mux1 after {withdrawn:?}");

    let t = Instant::now();
    speakers[0]
        .birdc(&["enable", VIP_PROTOCOL])
        .unwrap_or_else(|e| fail(e));
    wait_for_nexthops(&fleet.router, &[mux1, mux2], CONVERGE).unwrap_or_else(|e| fail(e));
    let returned = t.elapsed();
    eprintln!("enable {VIP_PROTOCOL} on mux1: router used both muxes again after {returned:?}");

    // Same state and same "since" on every session: none went down in between.
    assert_eq!(
        sessions(&router, &speakers),
        before,
        "a BGP session changed state\n{}",
        diagnostics(&lab, &router, &speakers)
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
}
