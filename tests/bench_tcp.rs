//! `lb bench tcp --json` as an operator runs it, briefly (root, iperf3 installed: see
//! scripts/debian-packages): it builds the fleet, runs iperf3 to the VIP through the kernel's
//! forwarding and through `lb mux` + `lb agent` for one 2-second round each, and prints one
//! JSON object per case with every figure. Its own test binary: its bulk TCP does not run
//! beside the loss-sensitive tests.

use std::process::Command;

use lb::netns::require_root;
use serde_json::Value;

/// The fields every case's object has (`null` where a figure does not apply).
const FIELDS: [&str; 11] = [
    "case",
    "io",
    "gbit_per_s",
    "rounds",
    "ratio_to_kernel",
    "mux_cpu_s_per_gb",
    "agent_cpu_s_per_gb",
    "per_round",
    "loadavg_start",
    "loadavg_end",
    "seconds",
];

/// The fields of every round.
const ROUND_FIELDS: [&str; 9] = [
    "round",
    "gbit_per_s",
    "bytes",
    "retransmits",
    "mux_cpu_s_per_gb",
    "agent_cpu_s_per_gb",
    "mux_cpu_percent",
    "agent_cpu_percent",
    "loadavg_start",
];

#[test]
fn the_tcp_benchmark_reports_the_kernel_and_mux_with_agent_as_json() {
    require_root("bench_tcp::the_tcp_benchmark_reports_the_kernel_and_mux_with_agent_as_json");
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["bench", "tcp", "--json", "--seconds", "2", "--rounds", "1"])
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
        assert!(c["gbit_per_s"].as_f64().unwrap() > 0.0, "{c}");
        let round = &c["per_round"][0];
        for field in ROUND_FIELDS {
            assert!(round.get(field).is_some(), "no {field} in {round}");
        }
        assert!(round["bytes"].as_u64().unwrap() > 0, "{c}");
    }
    let (kernel, lb) = (&cases[0], &cases[1]);
    assert_eq!(kernel["case"], "kernel");
    assert_eq!(kernel["ratio_to_kernel"].as_f64(), Some(1.0));
    assert_eq!(kernel["mux_cpu_s_per_gb"], Value::Null);
    assert_eq!(lb["case"], "lb");
    assert!(lb["ratio_to_kernel"].as_f64().unwrap() > 0.0, "{lb}");
    // Both processes carried the traffic: each used CPU time for it.
    assert!(lb["mux_cpu_s_per_gb"].as_f64().unwrap() > 0.0, "{lb}");
    assert!(lb["agent_cpu_s_per_gb"].as_f64().unwrap() > 0.0, "{lb}");
}
