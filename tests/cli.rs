//! The `lb` command line as an operator uses it: the real binary, real files, exit codes.
//!
//! Covers `check-config` (every example config is valid; bad configs name file, field and
//! reason; nothing panics), `table` and `table diff` (figures add up, the fleet fingerprint is
//! pinned, backend order does not matter, an unchanged VIP says so), the shape of `bench table
//! --json`, `lb status` and `lb ctl` against canned control-socket answers (aligned tables, no
//! raw JSON, `--json`), `lb lab get` on a non-200 answer, plain-text logs, and
//! scripts/debian-packages waiting for another apt.

use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread;

use serde_json::Value;

fn lb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(args)
        .output()
        .expect("the lb binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: exit code 1 (not a panic's 101), no panic message.
fn assert_clean_failure(o: &Output) {
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    assert!(!stderr(o).contains("panicked"), "{}", stderr(o));
}

fn example_configs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("config"))
            .expect("config/ exists")
            .map(|e| e.expect("readable entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
    files.sort();
    files
}

fn config_path(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Writes `text` to a file in a fresh temporary directory.
fn temp_config(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    fs::write(&path, text).expect("temp dir is writable");
    path.to_string_lossy().into_owned()
}

fn json(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    serde_json::from_slice(&o.stdout).expect("valid JSON")
}

#[test]
fn every_example_config_is_valid() {
    let files = example_configs();
    assert!(
        files.len() >= 3,
        "expected the example configs in config/, found {files:?}"
    );
    for file in &files {
        lb_core::config::Config::load(file).unwrap_or_else(|e| panic!("{e}"));
        let o = lb(&["check-config", &file.to_string_lossy()]);
        assert!(o.status.success(), "{}: {}", file.display(), stdout(&o));
        assert!(stdout(&o).trim_end().ends_with(": ok"), "{}", stdout(&o));
    }
}

#[test]
fn check_config_names_file_field_and_reason_for_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(config_path("lab-fleet.toml")).unwrap();
    let bad = text
        .replacen("table_size = 65537", "table_size = 65536", 1)
        .replacen("address = \"198.18.22.2\"", "address = \"2001:db8::22\"", 1)
        + "\n[[vip]]\nname = \"web-again\"\naddress = \"198.18.100.1\"\nprotocol = \"tcp\"\nport = \"all\"\nencap = \"gre\"\n";
    let path = temp_config(&dir, "bad.toml", &bad);
    let o = lb(&["check-config", &path]);
    assert_clean_failure(&o);
    let out = stdout(&o);
    for expected in [
        format!("{path}: vip[0].table_size: 65536 is not prime"),
        format!(
            "{path}: vip[0].backend[1].address: backend 2001:db8::22 is IPv6 but node.address_v6 is not set"
        ),
        format!("{path}: vip[2]: duplicate VIP: 198.18.100.1 tcp port all overlaps vip[0]"),
        format!("{path}: snat[0]: ports 1024..=65535 include vip[2] (\"web-again\", tcp port all)"),
    ] {
        assert!(out.contains(&expected), "missing {expected:?} in:\n{out}");
    }
    assert_eq!(out.lines().count(), 4, "{out}");

    let unknown = temp_config(
        &dir,
        "unknown.toml",
        &text.replacen("mtu = 1600", "mtu = 1600\nmut = 1500", 1),
    );
    let o = lb(&["check-config", &unknown]);
    assert_clean_failure(&o);
    assert!(
        stdout(&o).contains(&format!("{unknown}: node.mut: unknown field `mut`")),
        "{}",
        stdout(&o)
    );
}

#[test]
fn check_config_reports_every_type_and_unknown_field_error_and_what_the_nodes_need() {
    let dir = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(config_path("lab-fleet.toml")).unwrap();
    // Three read errors in three places (each used to hide the next), and a broken rule.
    let bad = text
        .replacen("mtu = 1600", "mtu = 1600\nmut = 1500", 1)
        .replacen("protocol = \"tcp\"", "protocol = \"sctp\"", 1)
        .replacen("name = \"be2\"", "name = \"be2\"\n  weight = \"heavy\"", 1)
        .replacen("interface = \"m0\"", "interface = \"../../etc\"", 1);
    let path = temp_config(&dir, "bad.toml", &bad);
    let o = lb(&["check-config", &path]);
    assert_clean_failure(&o);
    let out = stdout(&o);
    for expected in [
        format!("{path}: node.mut: unknown field `mut`"),
        format!("{path}: vip[0].protocol: unknown variant `sctp`"),
        "weight: invalid type: string \"heavy\"".to_owned(),
        format!("{path}: node.interface: \"../../etc\" is not a usable interface name"),
    ] {
        assert!(out.contains(&expected), "missing {expected:?} in:\n{out}");
    }

    // What a role needs, checked only when asked; a valid file shows its memory and probes.
    let good = config_path("lab-fleet.toml");
    let o = lb(&["check-config", "--role", "agent", &good]);
    assert_clean_failure(&o);
    assert!(
        stdout(&o).contains(": agent: lb agent needs an [agent] section"),
        "{}",
        stdout(&o)
    );
    let o = lb(&["check-config", "--role", "healthcheck", &good]);
    assert!(o.status.success(), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(out.contains("memory: about"), "{out}");
    assert!(
        out.contains(
            "VIP web: http checks probe each backend's own address, not the VIP: 198.18.21.2:80"
        ),
        "{out}"
    );
}

#[test]
fn a_config_over_the_memory_a_limited_process_has_is_refused_by_default() {
    let dir = tempfile::tempdir().unwrap();
    // The outside battery's case: 60 VIPs of 16 777 213 slots (about 3.8 GiB on a mux), which
    // aborted a mux on reload.
    let mut text =
        "[node]\nname = \"m\"\ninterface = \"m0\"\naddress_v4 = \"198.18.11.2\"\n".to_owned();
    for i in 0..60 {
        text.push_str(&format!(
            "[[vip]]\nname = \"v{i}\"\naddress = \"198.18.100.1\"\nprotocol = \"udp\"\nport = {}\nencap = \"ipip\"\ntable_size = 16777213\n[[vip.backend]]\naddress = \"198.18.21.2\"\n",
            1000 + i
        ));
    }
    let path = temp_config(&dir, "big.toml", &text);
    // With 4 GiB of address space (ulimit -v), the default budget is 2 GiB.
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 4194304 && exec {} check-config \"$0\"",
            env!("CARGO_BIN_EXE_lb")
        ))
        .arg(&path)
        .output()
        .unwrap();
    assert_clean_failure(&o);
    let out = stdout(&o);
    assert!(
        out.contains(&format!("{path}: node: this config needs about 38"))
            && out.contains("more than the 2048.0 MiB budget"),
        "{out}"
    );
}

#[test]
fn bad_health_check_config_is_rejected_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(config_path("lab-fleet.toml")).unwrap();
    let agent_of_nobody =
        "\n[[healthcheck.agent]]\nbackend = \"198.18.29.2\"\naddress = \"198.18.1.9\"\n";
    for (name, bad, expected) in [
        (
            "type.toml",
            text.replacen("type = \"http\"", "type = \"icmp\"", 1),
            "vip[0].check.type: unknown variant `icmp`, expected one of `tcp`, `http`, `udp`",
        ),
        (
            "timeout.toml",
            text.replacen("timeout_ms = 500", "timeout_ms = 1000", 1),
            "vip[0].check.timeout_ms: the timeout (1000 ms) must be shorter than the interval (1000 ms)",
        ),
        (
            "orphan.toml",
            text.clone() + agent_of_nobody,
            "healthcheck.agent[0].backend: 198.18.29.2 is listed under no VIP",
        ),
        (
            "bird.toml",
            text.replacen("{ \"198.18.100.1\" = \"vip4\" }", "{}", 1),
            "healthcheck.bgp.bird_protocols: VIP address 198.18.100.1 has no BIRD protocol",
        ),
    ] {
        assert_ne!(bad, text, "{name}: the edit did not apply");
        let path = temp_config(&dir, name, &bad);
        for command in [
            &["check-config", &path][..],
            &["healthcheck", "--config", &path, "--no-metrics"][..],
        ] {
            let o = lb(command);
            assert_clean_failure(&o);
            let said = stdout(&o) + &stderr(&o);
            assert!(
                said.contains(&format!("{path}: {expected}")),
                "{command:?}: missing {expected:?} in:\n{said}"
            );
        }
    }
}

#[test]
fn check_config_checks_every_file_and_fails_if_any_fails() {
    let dir = tempfile::tempdir().unwrap();
    let bad = temp_config(&dir, "empty.toml", "");
    let good = config_path("weighted.toml");
    let o = lb(&["check-config", &good, &bad]);
    assert_clean_failure(&o);
    assert!(stdout(&o).contains(&format!("{good}: ok")));
    assert!(
        stdout(&o).contains(&format!("{bad}: missing field `node`")),
        "{}",
        stdout(&o)
    );
}

#[test]
fn malformed_input_gives_a_clear_error_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            temp_config(&dir, "binary.toml", "\u{0}\u{1}\u{2}\u{ff}garbage"),
            "line 1",
        ),
        (
            temp_config(
                &dir,
                "huge.toml",
                "[node]\naddress_v4 = \"1.2.3.4\"\nmtu = 99999999999999999999",
            ),
            "node.mtu",
        ),
        (
            temp_config(&dir, "type.toml", "[node]\naddress_v4 = 5"),
            "node.address_v4",
        ),
        (
            temp_config(
                &dir,
                "vip.toml",
                "[node]\naddress_v4 = \"1.2.3.4\"\nvip = 3",
            ),
            "vip",
        ),
        (
            dir.path()
                .join("missing.toml")
                .to_string_lossy()
                .into_owned(),
            "cannot read the file",
        ),
        (
            dir.path().to_string_lossy().into_owned(),
            "cannot read the file",
        ),
    ];
    for (path, expected) in &cases {
        let o = lb(&["check-config", path]);
        assert_clean_failure(&o);
        assert!(stdout(&o).contains(expected), "{path}: {}", stdout(&o));
        for args in [
            vec!["table", path.as_str()],
            vec!["table", "diff", path.as_str(), path.as_str()],
        ] {
            let o = lb(&args);
            assert_clean_failure(&o);
            assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
        }
    }
}

#[test]
fn table_json_accounts_for_every_slot() {
    let out = json(&lb(&["table", &config_path("single-node.toml"), "--json"]));
    let vips = out["vips"].as_array().unwrap();
    assert_eq!(vips.len(), 3);
    for vip in vips {
        let size = vip["table_size"].as_u64().unwrap();
        let backends = vip["backends"].as_array().unwrap();
        let slots: u64 = backends.iter().map(|b| b["slots"].as_u64().unwrap()).sum();
        let share: f64 = backends.iter().map(|b| b["share"].as_f64().unwrap()).sum();
        assert_eq!(slots, size, "{vip}");
        assert!((share - 1.0).abs() < 1e-9);
        // Equal weights: every backend gets floor or ceil of M/N.
        let n = backends.len() as u64;
        assert!(
            backends
                .iter()
                .all(|b| [size / n, size.div_ceil(n)].contains(&b["slots"].as_u64().unwrap()))
        );
        assert!(vip["max_over_min"].as_f64().unwrap() < 1.001);
        assert_eq!(vip["fingerprint"].as_str().unwrap().len(), 18);
    }
}

#[test]
fn weights_and_drain_show_in_the_table() {
    let out = json(&lb(&["table", &config_path("weighted.toml"), "--json"]));
    let backends = out["vips"][0]["backends"].as_array().unwrap();
    let slots: Vec<u64> = backends
        .iter()
        .map(|b| b["slots"].as_u64().unwrap())
        .collect();
    assert_eq!(slots[3], 0, "weight 0 gets no slots: {slots:?}");
    let ratio = slots[2] as f64 / slots[0] as f64;
    assert!((ratio - 2.0).abs() < 0.01, "weight 2 vs 1: {slots:?}");
    let text = stdout(&lb(&["table", &config_path("weighted.toml")]));
    assert!(
        text.contains("be4") && text.contains("balance: max/min slots per unit of weight = 1.0"),
        "{text}"
    );
}

/// Every mux loads the lab fleet's VIPs; this pins what they build. If it changes, a fleet
/// running two versions of lb sends the same flow to different backends.
#[test]
fn lab_fleet_fingerprint_is_pinned() {
    let out = json(&lb(&[
        "table",
        &config_path("lab-fleet.toml"),
        "--vip",
        "web",
        "--json",
    ]));
    assert_eq!(out["vips"].as_array().unwrap().len(), 1);
    assert_eq!(out["vips"][0]["fingerprint"], "0x93ecc0b088883f21");
}

#[test]
fn backend_order_and_node_settings_do_not_change_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(config_path("lab-fleet.toml")).unwrap();
    // Another mux of the fleet: other node settings, backends of "web" listed in reverse.
    let reordered = text
        .replacen("name = \"mux1\"", "name = \"mux2\"", 1)
        .replacen("198.18.11.2", "198.18.12.2", 1)
        .replacen(
            "198.18.21.2\"\n  name = \"be1\"",
            "TMP\"\n  name = \"TMP\"",
            1,
        )
        .replacen(
            "198.18.23.2\"\n  name = \"be3\"",
            "198.18.21.2\"\n  name = \"be1\"",
            1,
        )
        .replacen(
            "TMP\"\n  name = \"TMP\"",
            "198.18.23.2\"\n  name = \"be3\"",
            1,
        );
    assert_ne!(reordered, text);
    let path = temp_config(&dir, "mux2.toml", &reordered);
    let a = json(&lb(&["table", &config_path("lab-fleet.toml"), "--json"]));
    let b = json(&lb(&["table", &path, "--json"]));
    for i in 0..2 {
        assert_eq!(a["vips"][i]["fingerprint"], b["vips"][i]["fingerprint"]);
    }
    let diff = json(&lb(&[
        "table",
        "diff",
        &config_path("lab-fleet.toml"),
        &path,
        "--json",
    ]));
    assert!(
        diff["vips"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["moved_fraction"] == 0.0)
    );
}

#[test]
fn table_selects_a_vip_and_rejects_an_unknown_one() {
    let o = lb(&["table", &config_path("single-node.toml"), "--vip", "dns"]);
    assert!(o.status.success());
    assert!(
        stdout(&o).starts_with("VIP dns 198.18.100.2 udp/all encap gre"),
        "{}",
        stdout(&o)
    );
    let o = lb(&["table", &config_path("single-node.toml"), "--vip", "nope"]);
    assert_clean_failure(&o);
    assert!(
        stderr(&o).contains("no VIP named \"nope\"; the config has: web, dns, web6"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn diff_of_removing_a_backend_moves_its_flows_and_little_else() {
    let dir = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(config_path("lab-fleet.toml")).unwrap();
    let without_be3 = text.replacen(
        "\n  [[vip.backend]]\n  address = \"198.18.23.2\"\n  name = \"be3\"\n",
        "\n",
        1,
    );
    assert_ne!(without_be3, text);
    let path = temp_config(&dir, "without-be3.toml", &without_be3);
    let out = json(&lb(&[
        "table",
        "diff",
        &config_path("lab-fleet.toml"),
        &path,
        "--json",
    ]));
    let vips = out["vips"].as_array().unwrap();
    let echo = vips.iter().find(|v| v["name"] == "echo").unwrap();
    assert_eq!(echo["moved_fraction"], 0.0);
    assert_eq!(echo["changed_slots"], 0);
    let web = vips.iter().find(|v| v["name"] == "web").unwrap();
    let be3 = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == "198.18.23.2")
        .unwrap();
    let moved = web["moved_fraction"].as_f64().unwrap();
    // All of be3's flows move; Maglev is near-minimal, so a few others move between be1 and be2.
    let be3_share = be3["old_share"].as_f64().unwrap();
    assert_eq!(be3["new_share"], 0.0);
    assert!((be3["lost"].as_f64().unwrap() - be3_share).abs() < 1e-12);
    assert!(moved >= be3_share && moved < be3_share + 0.01, "{web}");
    assert_eq!(web["changed_slots"].as_u64().unwrap(), 21880);
    let text = stdout(&lb(&[
        "table",
        "diff",
        &config_path("lab-fleet.toml"),
        &path,
    ]));
    assert!(
        text.contains("VIP web (changed): 33.386 % of new flows move (21880 of 65537 slots)"),
        "{text}"
    );
    assert!(
        text.contains("VIP echo (unchanged): 0.000 % of new flows move"),
        "{text}"
    );
}

#[test]
fn diff_reports_added_removed_and_resized_vips() {
    let dir = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(config_path("lab-fleet.toml")).unwrap();
    let resized = text
        .replacen("table_size = 65537", "table_size = 655373", 1)
        .replacen("name = \"echo\"", "name = \"echo2\"", 1);
    let path = temp_config(&dir, "resized.toml", &resized);
    let out = json(&lb(&[
        "table",
        "diff",
        &config_path("lab-fleet.toml"),
        &path,
        "--json",
    ]));
    let by_name = |n: &str| {
        out["vips"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by_name("echo")["status"], "removed");
    assert_eq!(by_name("echo")["moved_fraction"], 1.0);
    assert_eq!(by_name("echo2")["status"], "added");
    let web = by_name("web");
    assert_eq!(web["changed_slots"], Value::Null);
    let moved = web["moved_fraction"].as_f64().unwrap();
    assert!(
        moved > 0.5 && moved < 0.8,
        "a new table size reshuffles most flows: {moved}"
    );
}

#[test]
fn bench_table_quick_json_has_the_documented_fields() {
    let o = lb(&["bench", "table", "--quick", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let (summary, cases) = lines.split_last().unwrap();
    assert_eq!(
        cases.len(),
        12,
        "2 implementations x 2 sizes x 3 backend counts"
    );
    for case in cases {
        for field in [
            "impl",
            "m",
            "n",
            "build_ms_median",
            "lookup_ns_median",
            "max_over_min",
            "disruption_remove_one",
        ] {
            assert!(case.get(field).is_some(), "{field} missing in {case}");
        }
        assert!(case["build_ms_median"].as_f64().unwrap() > 0.0);
        if case["impl"] == "lb-core" {
            let n = case["n"].as_f64().unwrap();
            let d = case["disruption_remove_one"].as_f64().unwrap();
            assert!(d >= 1.0 / n - 1e-9 && d < 1.0 / n + 0.011, "{case}");
        }
    }
    let ratio = summary["ratio_build_vs_maglev_hash"].as_f64().unwrap();
    assert!(ratio.is_finite() && ratio > 0.0, "{summary}");
}

#[test]
fn an_unknown_experiment_is_refused_before_anything_is_built() {
    let o = lb(&["lab", "experiment", "mux-explodes"]);
    assert_clean_failure(&o);
    assert!(
        stderr(&o).contains("no experiment \"mux-explodes\"; there are: mux-dies"),
        "{}",
        stderr(&o)
    );
}

/// scripts/debian-packages, with stand-ins for `dpkg` (every package missing), `apt-get` (its
/// first `update` finds the lists locked, as when another apt runs) and `systemctl` first on
/// PATH: the install waits for the lock instead of failing, and both apt-get steps carry the
/// lock timeout.
#[test]
fn debian_packages_wait_for_another_apts_lock() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let calls = dir.path().join("calls");
    let stub = |name: &str, body: &str| {
        let path = bin.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    };
    stub("dpkg", "exit 1");
    stub("systemctl", "exit 0");
    stub(
        "apt-get",
        &format!(
            r#"echo "$*" >> {calls}
case "$*" in
  *update*)
    if [ ! -e {calls}.locked-once ]; then
      touch {calls}.locked-once
      echo "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 1 (apt-get)" >&2
      exit 100
    fi ;;
esac
exit 0"#,
            calls = calls.display()
        ),
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/debian-packages");
    let o = Command::new("bash")
        .args([
            "-c",
            &format!(
                "set -euo pipefail; source {}; install_debian_packages",
                script.display()
            ),
        ])
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("waiting for another apt"),
        "{}",
        stderr(&o)
    );
    let calls = fs::read_to_string(&calls).unwrap();
    let calls: Vec<&str> = calls.lines().collect();
    assert_eq!(
        calls.len(),
        3,
        "update (locked), update, install: {calls:?}"
    );
    assert!(calls[0].contains("update") && calls[1].contains("update"));
    assert!(calls[2].contains("install") && calls[2].contains("iproute2"));
    for call in calls {
        assert!(call.contains("-o DPkg::Lock::Timeout=600"), "{call}");
    }
}

/// A node's control socket that answers every request line with `answer`, and keeps the
/// requests it got (the server thread lives as long as the test process).
struct CannedNode {
    socket: String,
    requests: Arc<Mutex<Vec<Value>>>,
    _dir: tempfile::TempDir,
}

fn canned_node(answer: Value) -> CannedNode {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&requests);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                seen.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).expect("a JSON request"));
                writeln!(stream, "{answer}").unwrap();
                line.clear();
            }
        }
    });
    CannedNode {
        socket: path.to_string_lossy().into_owned(),
        requests,
        _dir: dir,
    }
}

/// A mux's `status` answer as the mux gives it, with two VIPs: `web` serving (backends whose
/// figures differ in width), `echo` with no healthy backend.
fn mux_status() -> Value {
    serde_json::json!({
        "ok": true, "node": "mux1", "config": "/etc/lb/mux1.toml", "generation": 7,
        "uptime_seconds": 3600,
        "reloads": {"ok": 2, "failed": 1, "last_error": "mux1.toml: vip[0].port: bad",
                    "held": "it would remove 2 of the 3 VIPs (a, b)"},
        "vips": [
            {"name": "web", "address": "198.18.100.1", "protocol": "tcp", "port": 80,
             "encap": "gre", "table_size": 65537, "fingerprint": "0x00112233aabbccdd",
             "healthy_backends": 2, "state": "serving",
             "backends": [
                {"address": "198.18.21.2", "name": "be1", "weight": 1, "effective_weight": 1,
                 "healthy": true, "drained": false, "slots": 32769, "packets": 5, "bytes": 300},
                {"address": "198.18.22.2", "name": null, "weight": 100, "effective_weight": 0,
                 "healthy": true, "health_reported": false, "drained": true, "slots": 0, "packets": 1234567,
                 "bytes": 987654321},
             ]},
            {"name": "echo", "address": "198.18.100.1", "protocol": "udp", "port": 7,
             "encap": "gre", "table_size": 65537, "fingerprint": null,
             "healthy_backends": 0, "state": "no_healthy_backend",
             "backends": [
                {"address": "198.18.21.2", "name": "be1", "weight": 1, "effective_weight": 0,
                 "healthy": false, "drained": false, "slots": 0, "packets": 0, "bytes": 0},
             ]},
        ],
        "counters": {"frames": 1234572, "encapsulated": 1234572, "passed": 0, "sent": 1234572,
                     "drops": {"no_backend": 12, "malformed": 0}},
        "conntrack": {"trusted": 3, "untrusted": 1, "capacity": 65536},
        "workers": [{"id": 0, "generation": 7, "batches": 10, "frames": 1234572,
                     "largest_batch": 64, "last_seen_ms": 3}],
    })
}

/// The lines of the table that starts with the line that contains `header`.
fn table_after<'a>(text: &'a str, header: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| !l.contains(header))
        .take_while(|l| !l.trim().is_empty() && !l.starts_with("VIP"))
        .collect()
}

/// The column where the last `word` of `line` ends.
fn end_of(line: &str, word: &str) -> usize {
    line.rfind(word)
        .unwrap_or_else(|| panic!("{word:?} in {line:?}"))
        + word.len()
}

#[test]
fn status_of_a_mux_is_aligned_tables_with_a_warning_for_a_vip_without_healthy_backends() {
    let node = canned_node(mux_status());
    let o = lb(&["status", "--socket", &node.socket]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        !text.contains('{') && !text.contains('"'),
        "no raw JSON: {text}"
    );
    let web = table_after(&text, "effective");
    assert_eq!(web.len(), 3, "{text}");
    let (header, be1, be2) = (web[0], web[1], web[2]);
    // Right-aligned numbers end where their header ends, whatever their width.
    for (column, a, b) in [
        ("weight", "1", "100"),
        ("slots", "32769", "0"),
        ("packets", "5", "1234567"),
        ("bytes", "300", "987654321"),
    ] {
        let end = end_of(header, column);
        assert_eq!(end, end_of(&be1[..end], a), "{column}:\n{text}");
        assert_eq!(end, end_of(&be2[..end], b), "{column}:\n{text}");
    }
    assert!(
        be1.contains("198.18.21.2 (be1)") && be2.contains("198.18.22.2"),
        "{text}"
    );
    assert!(text.contains("healthy backends 2  state serving"), "{text}");
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARNING")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains("VIP echo has no healthy backend"),
        "{text}"
    );
    let echo_heading = text
        .lines()
        .position(|l| l.starts_with("VIP echo"))
        .unwrap();
    assert!(
        text.lines()
            .nth(echo_heading + 1)
            .unwrap()
            .contains("WARNING")
    );
    assert!(
        text.starts_with("node mux1 (mux)  generation 7  uptime (s) 3600"),
        "{text}"
    );
    assert!(
        text.contains("last reload error: mux1.toml: vip[0].port: bad"),
        "{text}"
    );
    assert!(
        text.contains("config file is HELD: it would remove 2 of the 3 VIPs (a, b); `lb ctl reload` or SIGHUP applies it"),
        "{text}"
    );
    assert!(
        be2.contains("yes (not probed yet)") && !be1.contains("probed"),
        "{text}"
    );
    assert!(
        text.contains("drops.no_backend") && !text.contains("malformed"),
        "{text}"
    );

    // --json: the answer as it came.
    let o = lb(&["status", "--socket", &node.socket, "--json"]);
    assert_eq!(json(&o), mux_status());
    assert_eq!(
        node.requests.lock().unwrap()[0],
        serde_json::json!({"command": "status"})
    );
}

#[test]
fn status_shows_only_the_keys_a_node_gives() {
    // An older mux: no per-VIP health summary, no uptime, no workers.
    let mut answer = mux_status();
    for vip in answer["vips"].as_array_mut().unwrap() {
        let vip = vip.as_object_mut().unwrap();
        vip.remove("healthy_backends");
        vip.remove("state");
        for b in vip["backends"].as_array_mut().unwrap() {
            b.as_object_mut().unwrap().remove("bytes");
        }
    }
    let object = answer.as_object_mut().unwrap();
    object.remove("uptime_seconds");
    object.remove("workers");
    let node = canned_node(answer);
    let o = lb(&["status", "--socket", &node.socket]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for absent in [
        "healthy backends",
        "state",
        "WARNING",
        "uptime",
        "bytes",
        "worker",
        "null",
    ] {
        assert!(!text.contains(absent), "{absent}:\n{text}");
    }
    assert!(text.contains("packets"), "{text}");
}

#[test]
fn status_of_an_agent_lists_every_counter_as_a_row() {
    let node = canned_node(serde_json::json!({
        "ok": true, "role": "agent", "node": "be1", "addresses": ["198.18.21.2", "2001:db8:21::2"],
        "muxes": ["198.18.11.2", "198.18.12.2"], "tun": "lbtun0", "healthy": true,
        "last_seen_ms": 12,
        "counters": {"frames": 100, "delivered": 98, "rejected": {"not_a_mux": 2, "bad_checksum": 0},
                     "a_counter_added_later": 4242},
        "snat": [{"address": "198.18.100.1", "ranges": ["1024-1031", "2048-2055"],
                  "active_mappings": 3, "ports_in_use": 3},
                 {"address": "198.18.100.2",
                  "ranges": ["1024-1031", "2048-2055", "4096-4103", "8192-8207"],
                  "active_mappings": 0, "ports_in_use": 0}],
    }));
    let o = lb(&["status", "--socket", &node.socket]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        !text.contains('{') && !text.contains('"') && !text.contains('['),
        "{text}"
    );
    let row = |name: &str, value: &str| {
        text.lines().any(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            cells == [name, value]
        })
    };
    assert!(row("delivered", "98"), "{text}");
    assert!(row("rejected.not_a_mux", "2"), "{text}");
    assert!(row("a_counter_added_later", "4242"), "{text}");
    assert!(
        text.contains("addresses: 198.18.21.2, 2001:db8:21::2"),
        "{text}"
    );
    assert!(
        text.contains("1024-1031, 2048-2055 (2 ranges, 16 ports)"),
        "{text}"
    );
    assert!(
        text.contains("1024-1031, 2048-2055, 4096-4103, … (4 ranges, 40 ports)"),
        "hundreds of ranges are abbreviated: {text}"
    );
}

#[test]
fn status_of_a_sidecar_is_a_table_of_its_checks() {
    let node = canned_node(serde_json::json!({
        "ok": true, "role": "healthcheck", "node": "mux1", "config": "/etc/lb/mux1.toml",
        "muxes": [{"socket": "/run/lb/mux1.sock", "connected": true, "full_syncs": 1,
                   "updates": 4, "last_error": null}],
        "bgp": null,
        "backends": [
            {"vip": "web", "backend": "198.18.21.2", "healthy": true,
             "service": {"healthy": true, "last_success": true, "last_latency_ms": 1.25,
                         "transitions": 0},
             "agent": null},
            {"vip": "web", "backend": "198.18.22.2", "healthy": false,
             "service": {"healthy": false, "last_success": false,
                         "last_error": "connection refused", "transitions": 1},
             "agent": null},
        ],
    }));
    let o = lb(&["status", "--socket", &node.socket]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(!text.contains('{') && !text.contains('"'), "{text}");
    assert!(text.contains("up, ok 1.2 ms, 0 transitions"), "{text}");
    assert!(
        text.contains("UNHEALTHY") && text.contains("fail (connection refused)"),
        "{text}"
    );
    assert!(!text.contains("BGP"), "{text}");
}

#[test]
fn ctl_says_what_changed_and_json_gives_the_answer() {
    let node = canned_node(serde_json::json!({"ok": true, "changed": true, "generation": 7}));
    let o = lb(&[
        "ctl",
        "--socket",
        &node.socket,
        "drain",
        "198.18.21.2",
        "--vip",
        "web",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "generation 7: backend 198.18.21.2 drained in VIP web\n"
    );
    assert_eq!(
        node.requests.lock().unwrap()[0],
        serde_json::json!({"command": "drain", "backend": "198.18.21.2", "vip": "web"})
    );
    let o = lb(&[
        "ctl",
        "--socket",
        &node.socket,
        "set-health",
        "198.18.21.2",
        "unhealthy",
    ]);
    assert_eq!(
        stdout(&o),
        "generation 7: backend 198.18.21.2 marked unhealthy in every VIP that has it\n"
    );
    let o = lb(&["ctl", "--json", "--socket", &node.socket, "reload"]);
    assert_eq!(
        json(&o),
        serde_json::json!({"ok": true, "changed": true, "generation": 7})
    );
    let o = lb(&["ctl", "--socket", &node.socket, "reload"]);
    assert_eq!(stdout(&o), "config reloaded: generation 7\n");

    let unchanged = canned_node(serde_json::json!({"ok": true, "changed": false, "generation": 7}));
    let o = lb(&[
        "ctl",
        "--socket",
        &unchanged.socket,
        "undrain",
        "198.18.21.2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "nothing changed: generation 7 stays in force\n");

    let refused = canned_node(serde_json::json!({"ok": false, "error": "no VIP named \"www\""}));
    let o = lb(&[
        "ctl",
        "--socket",
        &refused.socket,
        "drain",
        "198.18.21.2",
        "--vip",
        "www",
    ]);
    assert_clean_failure(&o);
    assert_eq!(stdout(&o), "");
    assert!(
        stderr(&o).contains("no VIP named \"www\""),
        "{}",
        stderr(&o)
    );
}

/// An HTTP server on loopback that answers every request with `status` and `body`.
fn http_answering(status: &'static str, body: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let _ = write!(
                stream,
                "HTTP/1.0 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    address
}

#[test]
fn lab_get_fails_on_an_answer_other_than_200() {
    let o = lb(&[
        "lab",
        "get",
        &http_answering("500 Internal Server Error", ""),
    ]);
    assert_clean_failure(&o);
    assert_eq!(stdout(&o), "");
    assert!(
        stderr(&o).contains("500 Internal Server Error"),
        "{}",
        stderr(&o)
    );
    let o = lb(&["lab", "get", &http_answering("200 OK", "be2\n")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "be2\n");
}

#[test]
fn logs_have_no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("mux.sock");
    // Loads the config (logging what it publishes), then fails to open the interface.
    let o = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args([
            "mux",
            "--no-metrics",
            "--config",
            &config_path("single-node.toml"),
        ])
        .arg("--socket")
        .arg(&socket)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let log = stderr(&o);
    assert!(log.contains("published"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a log file: {log:?}"
    );
}
