//! `lb lab up|status|down` as an operator runs them (root): a persistent lab survives the
//! command that built it, serves real HTTP through its muxes, `up` again changes nothing,
//! `down` removes every namespace and process it made (and only those), and a namespace the
//! lab did not make is never touched. `lb lab demo` stopped by Ctrl-C (SIGINT to its process
//! group) or by SIGTERM to it alone removes its namespaces, processes and directory.

use std::path::Path;
use std::process::{Command, Output};

use lb::netns::require_root;

fn lb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(args)
        .output()
        .expect("the lb binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn namespaces(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Processes whose command line mentions `needle` (the lab's directory).
fn processes_with(needle: &str) -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .filter(|e| {
                    std::fs::read(e.path().join("cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                })
                .count()
        })
        .unwrap_or(0)
}

/// One HTTP/1.0 request to the VIP from the lab's client namespace: the backend's name.
fn get_from_client(client_ns: &str) -> String {
    let o = Command::new("ip")
        .args([
            "netns",
            "exec",
            client_ns,
            env!("CARGO_BIN_EXE_lb"),
            "lab",
            "get",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

#[test]
fn a_persistent_lab_comes_up_serves_and_goes_away_completely() {
    require_root("lab_cli_netns::a_persistent_lab_comes_up_serves_and_goes_away_completely");
    let name = format!("t{}", std::process::id());
    let prefix = format!("lbl-{name}-");
    let dir = format!("/run/lb-lab/{name}");
    let _cleanup = Cleanup(name.clone());

    let up = lb(&[
        "lab",
        "up",
        "--name",
        &name,
        "--muxes",
        "2",
        "--backends",
        "2",
    ]);
    assert!(up.status.success(), "{}", text(&up));
    assert!(
        text(&up).contains("mux1") && text(&up).contains("be2"),
        "{}",
        text(&up)
    );
    assert!(!namespaces(&prefix).is_empty());
    assert!(
        processes_with(&dir) >= 6,
        "muxes, sidecars, agents keep running after up exits"
    );

    // It serves: requests through the router and the muxes reach both backends.
    let client = format!("{prefix}client");
    let answers: Vec<String> = (0..20).map(|_| get_from_client(&client)).collect();
    for backend in ["be1", "be2"] {
        assert!(answers.iter().any(|a| a == backend), "{answers:?}");
    }

    let status = lb(&["lab", "status", "--name", &name]);
    assert!(status.status.success(), "{}", text(&status));
    let prints: Vec<String> = text(&status)
        .lines()
        .filter(|l| l.trim_start().starts_with("mux"))
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("web="))
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(prints.len(), 2, "{}", text(&status));
    assert_eq!(prints[0], prints[1], "the two muxes' tables agree");

    let again = lb(&["lab", "up", "--name", &name]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("already up"), "{}", text(&again));

    let down = lb(&["lab", "down", "--name", &name]);
    assert!(down.status.success(), "{}", text(&down));
    assert!(namespaces(&prefix).is_empty(), "{:?}", namespaces(&prefix));
    assert_eq!(processes_with(&dir), 0, "a lab process outlived down");
    assert!(!Path::new(&dir).exists());
    assert!(text(&lb(&["lab", "down", "--name", &name])).contains("is not up"));
    let status = lb(&["lab", "status", "--name", &name]);
    assert!(!status.status.success() && text(&status).contains("is not up"));
}

#[test]
fn a_namespace_the_lab_did_not_make_is_never_touched() {
    require_root("lab_cli_netns::a_namespace_the_lab_did_not_make_is_never_touched");
    let name = format!("f{}", std::process::id());
    let foreign = format!("lbl-{name}-foreign");
    let status = Command::new("ip")
        .args(["netns", "add", &foreign])
        .status()
        .unwrap();
    assert!(status.success());
    let up = lb(&["lab", "up", "--name", &name]);
    let down = lb(&["lab", "down", "--name", &name]);
    let still_there = namespaces(&foreign) == [foreign.clone()];
    let _ = Command::new("ip").args(["netns", "del", &foreign]).status();
    assert!(!up.status.success(), "up went ahead: {}", text(&up));
    assert!(text(&up).contains(&foreign), "{}", text(&up));
    assert!(text(&down).contains("is not up"), "{}", text(&down));
    assert!(still_there, "down removed a namespace it did not make");
}

/// Removes the lab if the test fails half-way.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = lb(&["lab", "down", "--name", &self.0]);
    }
}

/// Starts `lb lab demo` (a long live view, so the lab is still up when the signal comes) in its
/// own process group, as a shell starts a foreground job; returns it once the lab is up, with
/// its output so far.
fn demo_until_up() -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    let mut demo = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["lab", "demo", "--seconds", "60"])
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the lb binary runs");
    let stdout = demo.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Reads to the end: a closed pipe would end the demo before the signal.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.starts_with("up in") {
                    return (demo, seen);
                }
            }
            Err(_) => {
                let _ = demo.kill();
                let out = demo.wait_with_output().unwrap();
                panic!("the demo's lab did not come up:\n{seen}{}", text(&out));
            }
        }
    }
}

/// Sends `signal` to the started demo (`group`: to its whole process group, as a terminal's
/// Ctrl-C does) and checks that it exits with 128 + signal, leaving no namespace, directory
/// or process of its lab behind.
fn interrupt_demo(signal: i32, group: bool) {
    let (demo, seen) = demo_until_up();
    let pid = demo.id();
    let prefix = format!("lbt-demo-{pid}-");
    assert!(!namespaces(&prefix).is_empty(), "{seen}");
    let dirs = || -> Vec<String> {
        std::fs::read_dir(std::env::temp_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default()
    };
    let dir = std::env::temp_dir().join(dirs().first().expect("the lab's directory"));
    let dir = dir.to_string_lossy().into_owned();
    assert!(processes_with(&dir) >= 6, "muxes, sidecars, agents run");
    let target = if group { -(pid as i32) } else { pid as i32 };
    // SAFETY: kill has no memory-safety preconditions; the target is the process (group) this
    // test started and has not reaped.
    assert_eq!(unsafe { libc::kill(target, signal) }, 0);
    let out = wait_with_timeout(demo, std::time::Duration::from_secs(30));
    assert_eq!(
        out.status.code(),
        Some(128 + signal),
        "{seen}{}",
        text(&out)
    );
    assert!(namespaces(&prefix).is_empty(), "{:?}", namespaces(&prefix));
    assert!(dirs().is_empty(), "{:?}", dirs());
    assert_eq!(processes_with(&dir), 0, "a lab process outlived the demo");
}

/// The child's output once it exits; kills it (and fails) if it takes longer than `timeout`.
fn wait_with_timeout(mut child: std::process::Child, timeout: std::time::Duration) -> Output {
    let deadline = std::time::Instant::now() + timeout;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the demo did not exit after the signal:\n{}", text(&out));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn ctrl_c_during_the_demo_removes_its_namespaces_processes_and_directory() {
    require_root(
        "lab_cli_netns::ctrl_c_during_the_demo_removes_its_namespaces_processes_and_directory",
    );
    interrupt_demo(libc::SIGINT, true);
}

#[test]
fn sigterm_to_the_demo_alone_removes_its_namespaces_processes_and_directory() {
    require_root(
        "lab_cli_netns::sigterm_to_the_demo_alone_removes_its_namespaces_processes_and_directory",
    );
    interrupt_demo(libc::SIGTERM, false);
}
