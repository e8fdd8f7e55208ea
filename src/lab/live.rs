//! The fleet lab (`lb lab up|down|status`): a whole fleet on one machine, in network namespaces
//! of 198.18.0.0/15 only, with real processes: `lb mux` and its `lb healthcheck` sidecar on
//! every mux, `lb agent` and a real server (`lb lab serve`: HTTP and UDP echo) on every
//! backend, a router doing ECMP for the VIP (static multipath, a resilient nexthop group, or
//! BGP with BIRD 2 and the sidecars), a client, and an "internet" host for SNAT egress.
//!
//! ```text
//!  client ── router ──┬── mux1..muxK (+ spare muxes, started by `add_mux`)
//!                     ├── be1..beN   (+ spare backends, started by `add_backend`)
//!                     └── internet 198.19.0.2
//! ```
//!
//! Every mux loads the same `[[vip]]` sections (web: TCP 80 over GRE, so daisy chaining works;
//! echo: UDP 7 over GRE; SNAT on the VIP), so every mux builds the same tables. A persistent lab
//! ([`LiveLab::save`]) records what it made in `{dir}/lab.json`; [`LiveLab::down`] removes
//! exactly that.
//!
//! Invariant: the lab changes nothing outside its own namespaces and directory, and signals
//! only processes it started (see [`crate::netns`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use lb_dataplane::socket::request;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::bird_lab;
use crate::netns::{Lab, LabRecord, Namespace};
use crate::topology::{Fleet, FleetPlan};

/// The web service's port (TCP, GRE).
pub const WEB_PORT: u16 = 80;
/// The echo service's port (UDP, GRE).
pub const ECHO_PORT: u16 = 7;
/// The port of every agent's `/healthz`.
pub const AGENT_HEALTH_PORT: u16 = 9479;
/// The internet host's address ([`Fleet::add_internet`]).
pub const INTERNET: Ipv4Addr = Fleet::INTERNET;
/// Health-check timing in the lab: a dead backend leaves within interval × fall + 1 s.
pub const CHECK_INTERVAL_MS: u32 = 500;
/// Consecutive failures that take a backend out.
pub const CHECK_FALL: u32 = 3;
/// Consecutive successes that bring it back.
pub const CHECK_RISE: u32 = 2;
/// With static routing, how long after a mux dies the router's route loses it (the time
/// three missed 100 ms BFD packets take).
pub const FAILURE_DETECTION: Duration = Duration::from_millis(300);
/// The file in the lab's directory that records a lab `up` left running.
pub const RECORD: &str = "lab.json";
/// How long `up` waits for the fleet to settle.
const SETTLE: Duration = Duration::from_secs(30);

/// How the router spreads the VIP over the muxes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Routing {
    /// A static multipath route (a lost mux moves up to half of the flows).
    Multipath,
    /// A static resilient nexthop group (only a lost mux's flows move).
    Resilient,
    /// BGP: BIRD 2 on the router (`merge paths on`), a BIRD speaker per mux driven by its
    /// sidecar.
    Bgp,
}

/// What the lab builds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabPlan {
    /// Muxes serving from the start.
    pub muxes: usize,
    /// Muxes built but not started ([`LiveLab::add_mux`] starts one).
    pub spare_muxes: usize,
    /// Backends in the VIPs from the start.
    pub backends: usize,
    /// Backends wired but in no VIP and not started ([`LiveLab::add_backend`] starts one).
    pub spare_backends: usize,
    /// How the router reaches the muxes.
    pub routing: Routing,
    /// Daisy chaining on (muxes' `chain_window_seconds`, agents' `chaining`).
    pub chaining: bool,
    /// The `lb` binary the lab runs.
    pub lb: PathBuf,
}

impl Default for LabPlan {
    /// 3 muxes and 3 backends (plus one spare of each), static multipath, chaining on, this
    /// executable as `lb`.
    fn default() -> Self {
        Self {
            muxes: 3,
            spare_muxes: 1,
            backends: 3,
            spare_backends: 1,
            routing: Routing::Multipath,
            chaining: true,
            lb: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("lb")),
        }
    }
}

/// A process the lab started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    /// Its pid.
    pub pid: u32,
    /// Its control socket, if it has one.
    pub socket: Option<PathBuf>,
}

/// What `{dir}/lab.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    record: LabRecord,
    plan: LabPlan,
    procs: BTreeMap<String, Proc>,
    active_muxes: Vec<usize>,
    active_backends: Vec<usize>,
}

/// A running lab.
#[derive(Debug)]
pub struct LiveLab {
    /// The namespaces and processes.
    pub lab: Lab,
    /// The client, router, muxes and backends.
    pub fleet: Fleet,
    /// The internet host.
    pub internet: Namespace,
    /// What was built.
    pub plan: LabPlan,
    procs: BTreeMap<String, Proc>,
    active_muxes: Vec<usize>,
    active_backends: Vec<usize>,
    /// Backend weights other than 1.
    weights: BTreeMap<usize, u32>,
}

/// Waits until lab process `pid` (called `name` in the error) answers `status` on its control
/// socket; an error, with its log, if it exits first or takes 20 s.
pub fn wait_answering(lab: &mut Lab, pid: u32, socket: &Path, name: &str) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while request(socket, &json!({"command": "status"})).is_err() {
        if Instant::now() > deadline || !lab.running(pid) {
            return Err(other(format!("{name} did not start:\n{}", lab.log(pid))));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn other(message: String) -> io::Error {
    io::Error::other(message)
}

impl LiveLab {
    /// Builds the lab in `lab` (a fresh [`Lab`]: a test's, or a persistent one) and waits until
    /// it serves: every sidecar has probed every active backend and found it healthy, and the
    /// router reaches the VIP over every active mux.
    pub fn up(mut lab: Lab, plan: LabPlan) -> io::Result<LiveLab> {
        let total_muxes = plan.muxes + plan.spare_muxes;
        let total_backends = plan.backends + plan.spare_backends;
        let fleet = Fleet::build(
            &mut lab,
            &FleetPlan {
                muxes: total_muxes,
                backends: total_backends,
                resilient: plan.routing == Routing::Resilient,
                ipv6: false,
            },
        )?;
        fleet.add_backend_vips()?;
        let internet = fleet.add_internet(&mut lab)?;
        let mut live = LiveLab {
            lab,
            fleet,
            internet,
            plan: plan.clone(),
            procs: BTreeMap::new(),
            active_muxes: (1..=plan.muxes).collect(),
            active_backends: (1..=plan.backends).collect(),
            weights: BTreeMap::new(),
        };
        for j in 1..=plan.backends {
            live.start_backend(j)?;
        }
        live.start_internet_server()?;
        if plan.routing == Routing::Bgp {
            let all: Vec<usize> = (1..=total_muxes).collect();
            let router = bird_lab::start_router(&mut live.lab, &live.fleet, &all)?;
            live.procs.insert(
                "bird-router".into(),
                Proc {
                    pid: router.pid,
                    socket: Some(router.socket),
                },
            );
        }
        for i in 1..=plan.muxes {
            live.start_mux(i)?;
        }
        live.route()?;
        live.wait_settled(SETTLE)?;
        Ok(live)
    }

    /// The lab's directory: configs, sockets, logs, `lab.json`.
    pub fn dir(&self) -> &Path {
        self.lab.log_dir()
    }

    /// The muxes serving now (1-based).
    pub fn active_muxes(&self) -> &[usize] {
        &self.active_muxes
    }

    /// The backends in the VIPs now (1-based).
    pub fn active_backends(&self) -> &[usize] {
        &self.active_backends
    }

    /// The processes the lab started, by name (`mux1`, `hc1`, `agent1`, `server1`, …).
    pub fn procs(&self) -> &BTreeMap<String, Proc> {
        &self.procs
    }

    /// The `[[vip]]` and `[[snat]]` sections every node loads.
    fn service_sections(&self) -> String {
        let mut s = String::new();
        for (name, protocol, port, check) in [
            (
                "web",
                "tcp",
                WEB_PORT,
                "type = \"http\"\npath = \"/\"".to_owned(),
            ),
            (
                "echo",
                "udp",
                ECHO_PORT,
                "type = \"udp\"\nsend = \"health\"\nexpect = \"health\"".to_owned(),
            ),
        ] {
            let _ = write!(
                s,
                "\n[[vip]]\nname = \"{name}\"\naddress = \"{vip}\"\nprotocol = \"{protocol}\"\nport = {port}\nencap = \"gre\"\n\
                 [vip.check]\n{check}\ninterval_ms = {CHECK_INTERVAL_MS}\ntimeout_ms = 300\nrise = {CHECK_RISE}\nfall = {CHECK_FALL}\n",
                vip = Fleet::VIP
            );
            for &j in &self.active_backends {
                let _ = write!(
                    s,
                    "  [[vip.backend]]\n  address = \"{}\"\n  name = \"be{j}\"\n  weight = {}\n",
                    Fleet::backend_address(j),
                    self.weights.get(&j).copied().unwrap_or(1)
                );
            }
        }
        let _ = write!(
            s,
            "\n[[snat]]\naddress = \"{}\"\nfirst_port = 1024\nlast_port = 65535\nrange_size = 8\n",
            Fleet::VIP
        );
        s
    }

    /// Mux `i`'s config (also its sidecar's).
    pub fn mux_config(&self, i: usize) -> String {
        let dir = self.dir();
        let mut s = format!(
            "version = 1\n\n[node]\nname = \"mux{i}\"\ninterface = \"m0\"\naddress_v4 = \"{}\"\nmtu = 1600\n\
             io = \"{}\"\ncontrol_socket = {:?}\nchain_window_seconds = {}\n",
            Fleet::mux_address(i),
            crate::topology::lab_io().unwrap_or_default().as_str(),
            self.mux_socket(i),
            if self.plan.chaining { 30 } else { 0 },
        );
        s.push_str(&self.service_sections());
        let _ = write!(
            s,
            "\n[healthcheck]\ncontrol_socket = {:?}\n\
             [healthcheck.agent_check]\ntype = \"http\"\npath = \"/healthz\"\nport = {AGENT_HEALTH_PORT}\n\
             interval_ms = {CHECK_INTERVAL_MS}\ntimeout_ms = 300\nrise = {CHECK_RISE}\nfall = {CHECK_FALL}\n",
            self.sidecar_socket(i)
        );
        if self.plan.routing == Routing::Bgp {
            let _ = write!(
                s,
                "[healthcheck.bgp]\nspeaker = \"bird\"\nbird_socket = {:?}\nbird_protocols = {{ \"{}\" = \"{}\" }}\n",
                dir.join(format!("bird-mux{i}.ctl")),
                Fleet::VIP,
                bird_lab::VIP_PROTOCOL
            );
        }
        s
    }

    /// Backend `j`'s agent config.
    pub fn agent_config(&self, j: usize) -> String {
        let muxes: Vec<String> = (1..=self.plan.muxes + self.plan.spare_muxes)
            .map(|i| format!("\"{}/32\"", Fleet::mux_address(i)))
            .collect();
        let mut s = format!(
            "version = 1\n\n[node]\nname = \"be{j}\"\ninterface = \"b0\"\naddress_v4 = \"{b}\"\nio = \"{}\"\ncontrol_socket = {:?}\n\n\
             [agent]\nmuxes = [{}]\nchaining = {}\nhealth_address = \"{b}:{AGENT_HEALTH_PORT}\"\negress = [\"{INTERNET}/32\"]\n",
            crate::topology::lab_io().unwrap_or_default().as_str(),
            self.dir().join(format!("agent{j}.sock")),
            muxes.join(", "),
            self.plan.chaining,
            b = Fleet::backend_address(j),
        );
        s.push_str(&self.service_sections());
        s
    }

    /// Starts `lb ARGS` in `ns` as process `key`; with a socket, waits until it answers.
    fn start_lb(
        &mut self,
        key: &str,
        ns: &Namespace,
        args: &[&str],
        socket: Option<PathBuf>,
    ) -> io::Result<()> {
        let pid = self.lab.spawn(
            ns,
            Command::new(&self.plan.lb)
                .args(args)
                .env("RUST_LOG", "info"),
        )?;
        if let Some(socket) = &socket {
            wait_answering(&mut self.lab, pid, socket, key)?;
        }
        self.procs.insert(key.to_owned(), Proc { pid, socket });
        Ok(())
    }

    fn write_config(&self, name: &str, text: &str) -> io::Result<PathBuf> {
        let path = self.dir().join(format!("{name}.toml"));
        fs::write(&path, text)?;
        Ok(path)
    }

    /// Starts backend `j`: its server (`lb lab serve`) and its agent.
    fn start_backend(&mut self, j: usize) -> io::Result<()> {
        self.start_server(j)?;
        let config = self.write_config(&format!("agent{j}"), &self.agent_config(j))?;
        let ns = self.fleet.backend(j).clone();
        let socket = self.dir().join(format!("agent{j}.sock"));
        self.start_lb(
            &format!("agent{j}"),
            &ns,
            &["agent", "--config", &config.to_string_lossy()],
            Some(socket),
        )
    }

    /// Starts backend `j`'s server (again).
    pub fn start_server(&mut self, j: usize) -> io::Result<()> {
        let ns = self.fleet.backend(j).clone();
        self.start_lb(
            &format!("server{j}"),
            &ns,
            &[
                "lab",
                "serve",
                "--name",
                &format!("be{j}"),
                "--http",
                &format!("0.0.0.0:{WEB_PORT}"),
                "--udp",
                &format!("0.0.0.0:{ECHO_PORT}"),
            ],
            None,
        )
    }

    fn start_internet_server(&mut self) -> io::Result<()> {
        let ns = self.internet.clone();
        self.start_lb(
            "internet",
            &ns,
            &[
                "lab",
                "serve",
                "--name",
                "internet",
                "--http",
                &format!("{INTERNET}:{WEB_PORT}"),
                "--udp",
                &format!("{INTERNET}:{ECHO_PORT}"),
            ],
            None,
        )
    }

    /// Starts mux `i`: its BIRD speaker (BGP, first time only), `lb mux` and its sidecar.
    pub fn start_mux(&mut self, i: usize) -> io::Result<()> {
        if self.plan.routing == Routing::Bgp && !self.procs.contains_key(&format!("bird-mux{i}")) {
            let speaker = bird_lab::start_speaker(&mut self.lab, &self.fleet, i, false)?;
            self.procs.insert(
                format!("bird-mux{i}"),
                Proc {
                    pid: speaker.pid,
                    socket: Some(speaker.socket),
                },
            );
        }
        let config = self.write_config(&format!("mux{i}"), &self.mux_config(i))?;
        let config = config.to_string_lossy().into_owned();
        let ns = self.fleet.mux(i).clone();
        let socket = self.mux_socket(i);
        self.start_lb(
            &format!("mux{i}"),
            &ns,
            &["mux", "--config", &config, "--no-metrics"],
            Some(socket),
        )?;
        let sidecar = self.procs.get(&format!("hc{i}")).map(|p| p.pid);
        if !sidecar.is_some_and(|pid| self.lab.running(pid)) {
            let socket = self.sidecar_socket(i);
            self.start_lb(
                &format!("hc{i}"),
                &ns,
                &["healthcheck", "--config", &config, "--no-metrics"],
                Some(socket),
            )?;
        }
        Ok(())
    }

    /// Sends `signal` to lab process `key`.
    pub fn signal(&self, key: &str, signal: i32) -> io::Result<()> {
        let proc = self
            .procs
            .get(key)
            .ok_or_else(|| other(format!("no lab process {key}")))?;
        self.lab.signal(proc.pid, signal)
    }

    /// Waits for lab process `key` to exit.
    pub fn wait_exit(&mut self, key: &str, timeout: Duration) -> bool {
        let Some(pid) = self.procs.get(key).map(|p| p.pid) else {
            return true;
        };
        self.lab.wait(pid, timeout).is_some()
    }

    /// Static routing: the router's VIP route over the active muxes (BGP: the sidecars decide).
    pub fn route(&self) -> io::Result<()> {
        if self.plan.routing == Routing::Bgp {
            return Ok(());
        }
        self.fleet.route_vip_via(&self.active_muxes)
    }

    /// Kills mux `i`'s `lb mux` (SIGKILL, a crash). With static routing the router's route
    /// loses it [`FAILURE_DETECTION`] later, as a BFD-speed detection would; with BGP its
    /// sidecar withdraws it.
    pub fn kill_mux(&mut self, i: usize) -> io::Result<()> {
        self.signal(&format!("mux{i}"), libc::SIGKILL)?;
        self.wait_exit(&format!("mux{i}"), Duration::from_secs(5));
        self.active_muxes.retain(|&m| m != i);
        if self.plan.routing != Routing::Bgp {
            thread::sleep(FAILURE_DETECTION);
        }
        self.route()
    }

    /// Adds mux `i` (a spare, or one that was killed): starts it, then routes to it.
    pub fn add_mux(&mut self, i: usize) -> io::Result<()> {
        self.start_mux(i)?;
        if !self.active_muxes.contains(&i) {
            self.active_muxes.push(i);
            self.active_muxes.sort_unstable();
        }
        self.route()
    }

    /// Adds backend `j` to every VIP: rewrites every node's config and signals every mux,
    /// sidecar and agent to reload; returns once every mux publishes the new table.
    pub fn add_backend(&mut self, j: usize) -> io::Result<()> {
        if !self.active_backends.contains(&j) {
            self.active_backends.push(j);
            self.active_backends.sort_unstable();
        }
        // Its agent and server first: it must deliver (and chain) from the first packet.
        if !self.procs.contains_key(&format!("agent{j}")) {
            self.start_backend(j)?;
        }
        self.rewrite_configs()
    }

    /// Rewrites every config from the current state and reloads every node (SIGHUP); waits
    /// until every active mux serves a generation newer than before with agreeing tables.
    pub fn rewrite_configs(&mut self) -> io::Result<()> {
        let before: BTreeMap<usize, u64> = self
            .active_muxes
            .iter()
            .map(|&i| (i, self.mux_status(i)["generation"].as_u64().unwrap_or(0)))
            .collect();
        for i in 1..=self.plan.muxes + self.plan.spare_muxes {
            self.write_config(&format!("mux{i}"), &self.mux_config(i))?;
        }
        for j in 1..=self.plan.backends + self.plan.spare_backends {
            self.write_config(&format!("agent{j}"), &self.agent_config(j))?;
        }
        let nodes: Vec<u32> = self
            .procs
            .iter()
            .filter(|(key, _)| {
                key.starts_with("mux") || key.starts_with("hc") || key.starts_with("agent")
            })
            .map(|(_, p)| p.pid)
            .collect();
        for pid in nodes {
            if self.lab.running(pid) {
                let _ = self.lab.signal(pid, libc::SIGHUP);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let done = before
                .iter()
                .all(|(&i, &g)| self.mux_status(i)["generation"].as_u64().unwrap_or(0) > g);
            if done && self.fingerprints_agree() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(other(format!(
                    "the muxes did not all reload: {}",
                    self.summary()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sets backend `j`'s weight in every mux's config file (the muxes and sidecars pick it up
    /// when they reload: `lb ctl reload`, SIGHUP, or their file watchers).
    pub fn set_weight(&mut self, j: usize, weight: u32) -> io::Result<()> {
        self.weights.insert(j, weight);
        for i in 1..=self.plan.muxes + self.plan.spare_muxes {
            self.write_config(&format!("mux{i}"), &self.mux_config(i))?;
        }
        Ok(())
    }

    /// Mux `i`'s control socket.
    pub fn mux_socket(&self, i: usize) -> PathBuf {
        self.dir().join(format!("mux{i}.sock"))
    }

    /// Mux `i`'s sidecar's control socket.
    pub fn sidecar_socket(&self, i: usize) -> PathBuf {
        self.dir().join(format!("hc{i}.sock"))
    }

    /// Sends `command` to every active mux's control socket, in turn; an error names the mux
    /// that failed or refused. Returns how many muxes answered.
    pub fn on_every_mux(&self, command: &Value) -> io::Result<usize> {
        for &i in &self.active_muxes {
            let answer = request(&self.mux_socket(i), command)?;
            if answer["ok"] != true {
                return Err(other(format!("{command} on mux{i}: {answer}")));
            }
        }
        Ok(self.active_muxes.len())
    }

    /// Drains backend `j` on every active mux (`lb ctl drain`): no new flows, tracked ones stay.
    pub fn drain(&self, j: usize) -> io::Result<()> {
        self.on_every_mux(&json!({"command": "drain", "backend": Fleet::backend_address(j)}))
            .map(drop)
    }

    /// Undoes [`LiveLab::drain`].
    pub fn undrain(&self, j: usize) -> io::Result<()> {
        self.on_every_mux(&json!({"command": "undrain", "backend": Fleet::backend_address(j)}))
            .map(drop)
    }

    /// Mux `i`'s `status` answer (an error object if it does not answer).
    pub fn mux_status(&self, i: usize) -> Value {
        request(&self.mux_socket(i), &json!({"command": "status"}))
            .unwrap_or_else(|e| json!({"ok": false, "error": e.to_string()}))
    }

    /// Sidecar `i`'s `status` answer.
    pub fn sidecar_status(&self, i: usize) -> Value {
        request(&self.sidecar_socket(i), &json!({"command": "status"}))
            .unwrap_or_else(|e| json!({"ok": false, "error": e.to_string()}))
    }

    /// Whether every active mux has the same fingerprint for every VIP.
    pub fn fingerprints_agree(&self) -> bool {
        let prints: Vec<Vec<Value>> = self
            .active_muxes
            .iter()
            .map(|&i| {
                self.mux_status(i)["vips"]
                    .as_array()
                    .map(|v| v.iter().map(|vip| vip["fingerprint"].clone()).collect())
                    .unwrap_or_default()
            })
            .collect();
        prints
            .first()
            .is_some_and(|first| !first.is_empty() && prints.iter().all(|p| p == first))
    }

    /// Whether backend `j` is in every active mux's tables (healthy, not drained) — or out of
    /// all of them (`want` false).
    pub fn backend_in_tables(&self, j: usize, want: bool) -> bool {
        let address = Fleet::backend_address(j).to_string();
        self.active_muxes.iter().all(|&i| {
            let status = self.mux_status(i);
            status["vips"].as_array().is_some_and(|vips| {
                vips.iter().all(|vip| {
                    let present = vip["backends"].as_array().is_some_and(|bs| {
                        bs.iter().any(|b| {
                            b["address"] == address.as_str()
                                && b["healthy"] == true
                                && b["slots"].as_u64().unwrap_or(0) > 0
                        })
                    });
                    present == want
                })
            })
        })
    }

    /// Waits until the fleet serves: every active mux answers, every sidecar has probed every
    /// active backend and found it healthy, the muxes agree, and the router's VIP route goes
    /// over exactly the active muxes.
    pub fn wait_settled(&self, timeout: Duration) -> io::Result<Duration> {
        let start = Instant::now();
        let mut want: Vec<Ipv4Addr> = self
            .active_muxes
            .iter()
            .map(|&i| Fleet::mux_address(i))
            .collect();
        want.sort_unstable();
        loop {
            let sidecars_ready = self.active_muxes.iter().all(|&i| {
                let s = self.sidecar_status(i);
                s["backends"].as_array().is_some_and(|pairs| {
                    pairs.len() == 2 * self.active_backends.len()
                        && pairs.iter().all(|p| {
                            p["healthy"] == true
                                && p["service"]["last_success"] == true
                                && p["agent"]["last_success"] == true
                        })
                })
            });
            let mut hops = bird_lab::vip_nexthops(&self.fleet.router).unwrap_or_default();
            hops.sort_unstable();
            if sidecars_ready && self.fingerprints_agree() && hops == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                return Err(other(format!(
                    "the lab did not settle in {timeout:?} (route via {hops:?}, want {want:?}):\n{}",
                    self.summary()
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// One line per mux and per backend: what runs, generation, fingerprints, health.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let hops = bird_lab::vip_nexthops(&self.fleet.router).unwrap_or_default();
        let _ = writeln!(
            s,
            "lab {}  routing {:?}  VIP {} via {:?}",
            self.dir().display(),
            self.plan.routing,
            Fleet::VIP,
            hops
        );
        for i in 1..=self.plan.muxes + self.plan.spare_muxes {
            let status = self.mux_status(i);
            let state = if status["ok"] == true {
                let prints: Vec<String> = status["vips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| {
                        format!(
                            "{}={}",
                            v["name"].as_str().unwrap_or("?"),
                            v["fingerprint"].as_str().unwrap_or("-")
                        )
                    })
                    .collect();
                format!("generation {}  {}", status["generation"], prints.join(" "))
            } else if i > self.plan.muxes {
                "spare (not started)".to_owned()
            } else {
                format!("down ({})", status["error"].as_str().unwrap_or("?"))
            };
            let _ = writeln!(
                s,
                "  mux{i} {:<14} {state}",
                Fleet::mux_address(i).to_string()
            );
        }
        for j in 1..=self.plan.backends + self.plan.spare_backends {
            let role = if self.active_backends.contains(&j) {
                "in the VIPs"
            } else {
                "spare"
            };
            let agent = self
                .procs
                .get(&format!("agent{j}"))
                .and_then(|p| p.socket.as_ref())
                .map(|socket| request(socket, &json!({"command": "status"})))
                .and_then(Result::ok);
            let agent = agent.map_or_else(
                || "agent down".to_owned(),
                |a| {
                    format!(
                        "agent healthy {}, delivered {}",
                        a["healthy"], a["counters"]["delivered"]
                    )
                },
            );
            let _ = writeln!(
                s,
                "  be{j}  {:<14} {role:<12} {agent}",
                Fleet::backend_address(j).to_string()
            );
        }
        s
    }

    /// Leaves the lab running and records it in `{dir}/lab.json` (written atomically) for
    /// [`LiveLab::peek`] and [`LiveLab::down`].
    pub fn save(self) -> io::Result<PathBuf> {
        let dir = self.dir().to_owned();
        let LiveLab {
            lab,
            plan,
            procs,
            active_muxes,
            active_backends,
            ..
        } = self;
        let state = State {
            record: lab.detach(),
            plan,
            procs,
            active_muxes,
            active_backends,
        };
        let path = dir.join(RECORD);
        let text = serde_json::to_vec_pretty(&state).map_err(|e| other(e.to_string()))?;
        crate::netns::write_atomically(&path, &text)?;
        Ok(path)
    }

    fn read_state(dir: &Path) -> io::Result<Option<State>> {
        let path = dir.join(RECORD);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| other(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A look at the lab that `save` left running in `dir`, without taking it over: dropping
    /// the value leaves the lab as it is. `None`: there is none. A lab whose namespaces are
    /// gone is an error (remove it with [`LiveLab::down`]).
    pub fn peek(dir: &Path) -> io::Result<Option<LiveLab>> {
        let Some(state) = Self::read_state(dir)? else {
            return Ok(None);
        };
        let lab = Lab::view(state.record)?;
        let total = FleetPlan {
            muxes: state.plan.muxes + state.plan.spare_muxes,
            backends: state.plan.backends + state.plan.spare_backends,
            resilient: state.plan.routing == Routing::Resilient,
            ipv6: false,
        };
        let fleet = Fleet::attach(&lab, &total).map_err(|e| {
            other(format!(
                "the lab in {} is broken ({e}); remove it with `lb lab down`",
                dir.display()
            ))
        })?;
        let internet = lab.existing_namespace("inet").ok_or_else(|| {
            other(format!(
                "the lab in {} is broken (no internet namespace); remove it with `lb lab down`",
                dir.display()
            ))
        })?;
        Ok(Some(LiveLab {
            lab,
            fleet,
            internet,
            plan: state.plan,
            procs: state.procs,
            active_muxes: state.active_muxes,
            active_backends: state.active_backends,
            weights: BTreeMap::new(),
        }))
    }

    /// Whether a build in `dir` was interrupted (its journal is there, its record is not).
    pub fn interrupted(dir: &Path) -> bool {
        !dir.join(RECORD).exists() && dir.join(crate::netns::JOURNAL).exists()
    }

    /// Removes the lab recorded in `dir` (or the part of one an interrupted `up` built, from
    /// its journal): stops its processes and deletes its namespaces and the directory. Returns
    /// whether there was one. A record that cannot be read removes nothing.
    pub fn down(dir: &Path) -> io::Result<bool> {
        let record = match Self::read_state(dir)? {
            Some(state) => state.record,
            None => match Lab::journal(dir)? {
                Some(record) => record,
                None => return Ok(false),
            },
        };
        drop(Lab::reattach(record)?);
        let _ = fs::remove_dir_all(dir);
        Ok(true)
    }
}
