//! The resilience experiments of `lb lab` as tests (root): each builds its own lab (3 muxes,
//! 3 backends, a spare of each, static multipath unless said otherwise) and fails when its
//! property breaks. One more test turns daisy chaining off and shows the "backend added, then
//! a mux dies" case breaking connections: the property is real, and the experiment sees it.
//!
//! The labs run one at a time (a lock): several fleets at once on two cores would measure the
//! machine, not the load balancer.

use std::sync::Mutex;

use lb::lab::experiment::{self, Outcome};
use lb::lab::live::{LabPlan, LiveLab, Routing};
use lb::netns::{Lab, require_root};

static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

fn plan() -> LabPlan {
    LabPlan {
        lb: env!("CARGO_BIN_EXE_lb").into(),
        ..LabPlan::default()
    }
}

/// Runs `names` in order on one fresh lab built from `plan`; returns their outcomes.
fn run(tag: &str, plan: LabPlan, names: &[&str]) -> Vec<Outcome> {
    require_root(&format!("experiments_netns::{tag}"));
    let _one = ONE_LAB_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let lab = Lab::new(tag).unwrap();
    let mut live = LiveLab::up(lab, plan).unwrap_or_else(|e| panic!("lab up: {e}"));
    names
        .iter()
        .map(|name| {
            let o = experiment::run(&mut live, name)
                .unwrap_or_else(|e| panic!("{name}: {e}\n{}", live.summary()));
            eprintln!("{}", o.line());
            o
        })
        .collect()
}

fn assert_passed(outcomes: &[Outcome]) {
    for o in outcomes {
        assert!(o.passed, "{}\n{o:#?}", o.line());
    }
}

#[test]
fn a_mux_dies_and_no_connection_breaks() {
    assert_passed(&run("xmuxdies", plan(), &["mux-dies"]));
}

#[test]
fn a_mux_is_added_and_no_connection_breaks() {
    // The spare mux joins the route.
    assert_passed(&run("xmuxadd", plan(), &["mux-added"]));
}

#[test]
fn a_backend_is_added_then_a_mux_dies_and_no_connection_breaks() {
    assert_passed(&run("xbeadd", plan(), &["backend-added"]));
}

#[test]
fn without_daisy_chaining_the_same_case_breaks_connections() {
    let outcomes = run(
        "xnochain",
        LabPlan {
            chaining: false,
            ..plan()
        },
        &["backend-added"],
    );
    let o = &outcomes[0];
    assert!(
        !o.passed && o.broken > 0,
        "with chaining off, a backend added and a mux lost must break the moved connections: {}",
        o.line()
    );
}

#[test]
fn a_drained_backend_keeps_its_connections_and_gets_no_new_ones() {
    assert_passed(&run("xdrain", plan(), &["backend-drained"]));
}

#[test]
fn a_dead_server_breaks_only_its_own_connections_and_leaves_every_table_in_time() {
    assert_passed(&run("xbedies", plan(), &["backend-dies"]));
}

#[test]
fn a_hundred_reloads_under_load_lose_no_datagram() {
    assert_passed(&run("xreload", plan(), &["reloads"]));
}

#[test]
fn every_backend_reaches_the_internet_through_snat_at_once() {
    assert_passed(&run("xsnat", plan(), &["snat-egress"]));
}

#[test]
fn with_bgp_a_mux_dies_and_is_added_back_without_breaking_connections() {
    let outcomes = run(
        "xbgp",
        LabPlan {
            routing: Routing::Bgp,
            ..plan()
        },
        &["mux-dies", "mux-added"],
    );
    assert_passed(&outcomes);
}

#[test]
fn with_a_resilient_nexthop_group_a_mux_dies_and_is_added_back_without_breaking_connections() {
    let outcomes = run(
        "xresil",
        LabPlan {
            routing: Routing::Resilient,
            ..plan()
        },
        &["mux-dies", "mux-added"],
    );
    assert_passed(&outcomes);
}
