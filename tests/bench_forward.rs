//! `lb bench forward` as an operator runs it, briefly (root): it builds its namespaces, measures
//! the kernel and `lb mux` with 1 and 2 workers, and prints a row for each. Its own test binary,
//! so its bursts of traffic do not run beside the loss-sensitive tests of tests/mux_netns.rs.

use std::process::Command;

use lb::netns::require_root;

#[test]
fn the_forwarding_benchmark_runs_and_reports_every_case() {
    require_root("mux_netns::the_forwarding_benchmark_runs_and_reports_every_case");
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args([
            "bench",
            "forward",
            "--seconds",
            "0.3",
            "--rounds",
            "1",
            "--flows",
            "64",
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for case in [
        "| kernel |",
        "| lb mux, 1 worker |",
        "| lb mux, 2 workers |",
    ] {
        let row = table
            .lines()
            .find(|l| l.starts_with(case))
            .unwrap_or_else(|| panic!("no {case} row in:\n{table}"));
        let delivered: f64 = row.split('|').nth(2).unwrap().trim().parse().unwrap();
        assert!(
            delivered > 1000.0,
            "{case} delivered {delivered} pps:\n{table}"
        );
    }
}
