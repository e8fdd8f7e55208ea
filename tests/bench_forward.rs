//! `lb bench forward --json` as an operator runs it, briefly (root): it builds its namespaces,
//! measures the kernel and `lb mux` on AF_PACKET with one worker for one short round, and
//! prints one JSON object per case with every figure. Its own test binary, so its bursts of
//! traffic do not run beside the loss-sensitive tests of tests/mux_netns.rs.

use std::process::Command;

use lb::netns::require_root;
use serde_json::Value;

/// The fields every case's object has (`null` where a figure does not apply).
const FIELDS: [&str; 13] = [
    "case",
    "workers",
    "offered_pps",
    "delivered_pps",
    "ratio_to_kernel",
    "mux_cpu_ns_per_packet",
    "kernel_drops",
    "rounds",
    "per_round",
    "loadavg_start",
    "loadavg_end",
    "sender",
    "sender_threads",
];

/// The fields of every round.
const ROUND_FIELDS: [&str; 8] = [
    "round",
    "offered_pps",
    "delivered_pps",
    "mux_cpu_ns_per_packet",
    "kernel_drops",
    "mux_frames",
    "loadavg_start",
    "loadavg_end",
];

#[test]
fn the_forwarding_benchmark_reports_every_figure_of_the_kernel_and_the_mux_as_json() {
    require_root(
        "bench_forward::the_forwarding_benchmark_reports_every_figure_of_the_kernel_and_the_mux_as_json",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args([
            "bench",
            "forward",
            "--json",
            "--seconds",
            "0.3",
            "--rounds",
            "1",
            "--flows",
            "64",
            "--cases",
            "kernel,af_packet",
            "--workers",
            "1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(cases.len(), 2, "{stdout}");
    for c in &cases {
        for field in FIELDS {
            assert!(c.get(field).is_some(), "no {field} in {c}");
        }
        assert_eq!(c["error"], Value::Null, "{c}");
        assert_eq!(c["rounds"], 1, "{c}");
        let delivered = c["delivered_pps"].as_f64().unwrap();
        assert!(delivered > 0.0, "{c}");
        assert!(c["offered_pps"].as_f64().unwrap() >= delivered * 0.5, "{c}");
        let rounds = c["per_round"].as_array().unwrap();
        assert_eq!(rounds.len(), 1, "{c}");
        for field in ROUND_FIELDS {
            assert!(
                rounds[0].get(field).is_some(),
                "no {field} in {}",
                rounds[0]
            );
        }
        assert_eq!(c["loadavg_start"].as_array().unwrap().len(), 3, "{c}");
    }
    let (kernel, mux) = (&cases[0], &cases[1]);
    assert_eq!(kernel["case"], "kernel");
    assert_eq!(kernel["workers"], Value::Null);
    assert_eq!(kernel["ratio_to_kernel"].as_f64(), Some(1.0));
    assert_eq!(kernel["mux_cpu_ns_per_packet"], Value::Null);
    assert_eq!(mux["case"], "af_packet");
    assert_eq!(mux["workers"], 1);
    assert!(mux["ratio_to_kernel"].as_f64().unwrap() > 0.0, "{mux}");
    assert!(
        mux["mux_cpu_ns_per_packet"].as_f64().unwrap() > 0.0,
        "{mux}"
    );
    assert!(mux["kernel_drops"].is_u64(), "{mux}");
    // The mux saw at least the frames it delivered (the sink counts only what it forwarded).
    let round = &mux["per_round"][0];
    let frames = round["mux_frames"].as_u64().unwrap() as f64;
    assert!(
        frames >= round["delivered_pps"].as_f64().unwrap() * 0.3 * 0.9,
        "{mux}"
    );
}
