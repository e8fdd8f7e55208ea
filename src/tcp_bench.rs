//! `lb bench tcp`: TCP throughput (iperf3) from a client to the VIP through `lb mux` and
//! `lb agent`, against the kernel's plain IP forwarding over the same hops, in the same run.
//!
//! The lab's own fleet ([`Fleet`]) with one mux and one backend:
//!
//! ```text
//!  client ── router ── mux1        client → VIP: client → router → mux1 → router → be1
//!              └────── be1         be1 → client (direct server return): be1 → router → client
//! ```
//! - **kernel**: no mux, no agent. mux1 forwards (`ip_forward=1`, ICMP redirects off) back to
//!   the router, whose policy rule sends what comes from mux1 to the VIP on to be1 (table
//!   [`KERNEL_TABLE`]); be1 has the VIP on `lo` and answers directly.
//! - **lb**: `lb agent` on be1, `lb mux` on mux1 (`ip_forward=0`), GRE to be1; the agent
//!   decapsulates into its TUN; be1 answers directly. `[node] io` of both is the case's I/O
//!   (`lb` alone: the build's default, `auto`).
//! - iperf3's server listens on the VIP on be1 for the whole run; each round runs one iperf3
//!   client (`--json`, `-t seconds`) on the client. Cases alternate round by round; a case's
//!   figure is its median and its ratio to the kernel's median.
//! - The client's transmit checksum offload is off (the fleet does it: a userspace component
//!   copies its packets), the mux and backend links have MTU 1600 (room for the outer header
//!   of a full 1500-byte packet), `rp_filter` is 0 everywhere (LAB.md).
//! - Per round of an lb case: the mux's and the agent's CPU time over the client's run
//!   ([`ProcessCpu`]), as seconds per GB received and as a share of one core.
//!
//! **Invariants.** Everything lives in namespaces the benchmark creates and removes (a
//! [`Lab`]); addresses are from 198.18.0.0/15; every iperf3 client is bounded in time (its
//! `-t`, and killed after `seconds + 20 s`); only processes it started are signalled.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::forward_bench::{Io, IoInForce, config_with_io, mux_status};
use crate::lab::live::wait_answering;
use crate::measure::{ProcessCpu, loadavg, median};
use crate::netns::{Lab, Namespace, require_root};
use crate::topology::{Fleet, FleetPlan};

/// iperf3's port on the VIP.
pub const PORT: u16 = 5201;
/// The router's routing table for the kernel case's second hop (mux1 → be1).
pub const KERNEL_TABLE: u32 = 100;
/// How long an iperf3 client may run beyond its `-t` before it is killed.
const CLIENT_GRACE: Duration = Duration::from_secs(20);

/// What forwards in a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpCase {
    /// The kernel's IP forwarding on mux1.
    Kernel,
    /// `lb mux` and `lb agent`, both with `[node] io` this I/O (`None`: the build's default).
    Lb(Option<Io>),
}

impl TcpCase {
    /// `kernel`, `lb`, `lb_af_packet`, `lb_af_xdp`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Lb(None) => "lb",
            Self::Lb(Some(Io::AfPacket)) => "lb_af_packet",
            Self::Lb(Some(Io::AfXdp)) => "lb_af_xdp",
        }
    }
}

impl std::str::FromStr for TcpCase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Self::Kernel,
            Self::Lb(None),
            Self::Lb(Some(Io::AfPacket)),
            Self::Lb(Some(Io::AfXdp)),
        ]
        .into_iter()
        .find(|c| c.name() == s)
        .ok_or_else(|| format!("unknown case {s:?}: kernel, lb, lb_af_packet or lb_af_xdp"))
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct TcpPlan {
    /// Seconds of each iperf3 run.
    pub duration: Duration,
    /// Rounds of every case.
    pub rounds: usize,
    /// Parallel TCP streams of each run (iperf3 `-P`).
    pub streams: usize,
    /// The cases, in the order each round runs them.
    pub cases: Vec<TcpCase>,
}

impl Default for TcpPlan {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(10),
            rounds: 3,
            streams: 1,
            cases: vec![TcpCase::Kernel, TcpCase::Lb(None)],
        }
    }
}

/// One round of one case.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TcpRound {
    /// 1, 2, …
    pub round: usize,
    /// Received goodput, Gbit/s (iperf3's receiver side).
    pub gbit_per_s: f64,
    /// Bytes the server received.
    pub bytes: u64,
    /// TCP retransmissions of the sender.
    pub retransmits: Option<u64>,
    /// The mux's CPU seconds per GB received.
    pub mux_cpu_s_per_gb: Option<f64>,
    /// The agent's CPU seconds per GB received.
    pub agent_cpu_s_per_gb: Option<f64>,
    /// The mux's CPU time over the run, in % of one core.
    pub mux_cpu_percent: Option<f64>,
    /// The agent's CPU time over the run, in % of one core.
    pub agent_cpu_percent: Option<f64>,
    /// The mux's I/O as its status showed it.
    pub mux_io: Option<IoInForce>,
    /// Load average when the round started.
    pub loadavg_start: [f64; 3],
    /// Load average when the round ended.
    pub loadavg_end: [f64; 3],
}

/// A measured case: one JSON object of `lb bench tcp --json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TcpReport {
    /// `kernel`, `lb`, `lb_af_packet` or `lb_af_xdp`.
    pub case: &'static str,
    /// The `[node] io` asked of the mux and the agent (`null`: the build's default, or none).
    pub io: Option<&'static str>,
    /// Seconds per run.
    pub seconds: f64,
    /// Parallel streams per run.
    pub streams: usize,
    /// Rounds measured.
    pub rounds: usize,
    /// Median Gbit/s received.
    pub gbit_per_s: Option<f64>,
    /// Median over the kernel case's median.
    pub ratio_to_kernel: Option<f64>,
    /// Median of the rounds' mux CPU seconds per GB.
    pub mux_cpu_s_per_gb: Option<f64>,
    /// Median of the rounds' agent CPU seconds per GB.
    pub agent_cpu_s_per_gb: Option<f64>,
    /// Every round.
    pub per_round: Vec<TcpRound>,
    /// Load average when the benchmark started.
    pub loadavg_start: [f64; 3],
    /// Load average when it ended.
    pub loadavg_end: [f64; 3],
    /// The mux's I/O in force, as its status showed it in the last round.
    pub mux_io: Option<IoInForce>,
    /// Why the case could not run (from the round named in it on).
    pub error: Option<String>,
}

impl TcpReport {
    fn summarize(&mut self, kernel: Option<f64>) {
        let of = |f: fn(&TcpRound) -> Option<f64>| {
            median(&self.per_round.iter().filter_map(f).collect::<Vec<_>>())
        };
        self.rounds = self.per_round.len();
        self.mux_io = self.per_round.iter().rev().find_map(|r| r.mux_io.clone());
        self.gbit_per_s = of(|r| Some(r.gbit_per_s));
        self.mux_cpu_s_per_gb = of(|r| r.mux_cpu_s_per_gb);
        self.agent_cpu_s_per_gb = of(|r| r.agent_cpu_s_per_gb);
        self.ratio_to_kernel = match (self.gbit_per_s, kernel) {
            (Some(g), Some(k)) if k > 0.0 => Some(g / k),
            _ => None,
        };
    }
}

/// iperf3's `--json` answer, the parts read here.
#[derive(Debug, Default, Deserialize)]
struct IperfOutput {
    #[serde(default)]
    end: IperfEnd,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct IperfEnd {
    #[serde(default)]
    sum_sent: Option<IperfSum>,
    #[serde(default)]
    sum_received: Option<IperfSum>,
}

#[derive(Debug, Deserialize)]
struct IperfSum {
    bytes: u64,
    bits_per_second: f64,
    #[serde(default)]
    retransmits: Option<u64>,
}

/// What one client run measured.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Transfer {
    bits_per_second: f64,
    bytes: u64,
    retransmits: Option<u64>,
}

fn parse_iperf(json: &str) -> Result<Transfer, String> {
    let out: IperfOutput =
        serde_json::from_str(json).map_err(|e| format!("iperf3's JSON ({e}): {json}"))?;
    if let Some(e) = out.error {
        return Err(format!("iperf3: {e}"));
    }
    let received = out
        .end
        .sum_received
        .ok_or_else(|| format!("iperf3's JSON has no end.sum_received: {json}"))?;
    Ok(Transfer {
        bits_per_second: received.bits_per_second,
        bytes: received.bytes,
        retransmits: out.end.sum_sent.and_then(|s| s.retransmits),
    })
}

/// Why a case stopped: it could not run (reported, the benchmark goes on), or the benchmark
/// itself failed.
enum CaseFailure {
    CouldNotRun(String),
    Fatal(io::Error),
}

impl From<io::Error> for CaseFailure {
    fn from(e: io::Error) -> Self {
        Self::Fatal(e)
    }
}

/// A running `lb` process of a round.
struct Node {
    pid: u32,
    socket: PathBuf,
}

struct Bench<'a> {
    lab: Lab,
    fleet: Fleet,
    plan: &'a TcpPlan,
    lb: &'a Path,
}

fn build(lab: &mut Lab) -> io::Result<Fleet> {
    let fleet = Fleet::build(
        lab,
        &FleetPlan {
            muxes: 1,
            backends: 1,
            resilient: false,
            ipv6: false,
        },
    )?;
    fleet.add_backend_vips()?;
    // The kernel case's second hop: from mux1 back through the router to be1.
    let table = KERNEL_TABLE.to_string();
    let vip = format!("{}/32", Fleet::VIP);
    fleet.router.ip(&[
        "route",
        "add",
        &vip,
        "via",
        &Fleet::backend_address(1).to_string(),
        "dev",
        "r-b1",
        "table",
        &table,
    ])?;
    fleet.router.ip(&[
        "rule", "add", "iif", "r-m1", "to", &vip, "lookup", &table, "pref", "100",
    ])?;
    // mux1 forwards out of the link it received on: no ICMP redirects to the router.
    for key in [
        "net.ipv4.conf.all.send_redirects",
        "net.ipv4.conf.m0.send_redirects",
    ] {
        fleet.mux(1).sysctl(key, "0")?;
    }
    Ok(fleet)
}

impl Bench<'_> {
    fn socket(&self, name: &str) -> PathBuf {
        self.lab.log_dir().join(format!("{name}.sock"))
    }

    fn mux_config(&self, io: Option<Io>) -> Result<String, String> {
        let socket = self.socket("mux1");
        config_with_io(io, "the TCP benchmark's mux config", |io_line| {
            format!(
                "[node]\nname = \"mux1\"\ninterface = \"m0\"\naddress_v4 = \"{}\"\nmtu = 1600\n\
                 control_socket = {socket:?}\n{io_line}\n{}",
                Fleet::mux_address(1),
                vip_section()
            )
        })
    }

    fn agent_config(&self, io: Option<Io>) -> Result<String, String> {
        let socket = self.socket("agent1");
        config_with_io(io, "the TCP benchmark's agent config", |io_line| {
            format!(
                "[node]\nname = \"be1\"\ninterface = \"b0\"\naddress_v4 = \"{}\"\ncontrol_socket = {socket:?}\n{io_line}\n\
                 [agent]\nmuxes = [\"{}/32\"]\n\n{}",
                Fleet::backend_address(1),
                Fleet::mux_address(1),
                vip_section()
            )
        })
    }

    /// Starts `lb ROLE` in `ns` with `config` and waits until it answers on its socket.
    fn start(
        &mut self,
        ns: &Namespace,
        role: &str,
        name: &str,
        config: &str,
    ) -> Result<Node, CaseFailure> {
        let path = self.lab.log_dir().join(format!("{name}.toml"));
        fs::write(&path, config)?;
        let socket = self.socket(name);
        let pid = self.lab.spawn(
            ns,
            Command::new(self.lb)
                .args([role, "--no-metrics", "--config"])
                .arg(&path)
                .env("RUST_LOG", "warn"),
        )?;
        if let Err(e) = wait_answering(&mut self.lab, pid, &socket, &format!("lb {role}")) {
            if self.lab.running(pid) {
                let _ = self.lab.signal(pid, libc::SIGKILL);
                self.lab.wait(pid, Duration::from_secs(5));
            }
            return Err(CaseFailure::CouldNotRun(e.to_string()));
        }
        Ok(Node { pid, socket })
    }

    fn stop(&mut self, node: &Node, what: &str) -> Result<(), CaseFailure> {
        self.lab.signal(node.pid, libc::SIGTERM)?;
        let status = self.lab.wait(node.pid, Duration::from_secs(10));
        if status.is_none_or(|s| !s.success()) {
            if status.is_none() {
                let _ = self.lab.signal(node.pid, libc::SIGKILL);
                self.lab.wait(node.pid, Duration::from_secs(5));
            }
            return Err(CaseFailure::CouldNotRun(format!(
                "{what} did not stop cleanly ({status:?}): {}",
                self.lab.log(node.pid)
            )));
        }
        Ok(())
    }

    /// One iperf3 client run from the client namespace, bounded in time.
    fn client(&mut self, round: usize, case: &str) -> Result<Transfer, CaseFailure> {
        let out = self
            .lab
            .log_dir()
            .join(format!("iperf3-{case}-{round}.json"));
        let seconds = format!("{:.1}", self.plan.duration.as_secs_f64());
        let streams = self.plan.streams.to_string();
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                self.fleet.client.name(),
                "iperf3",
                "--client",
            ])
            .arg(Fleet::VIP.to_string())
            .args(["--port", &PORT.to_string(), "--time", &seconds])
            .args([
                "--parallel",
                &streams,
                "--json",
                "--connect-timeout",
                "3000",
            ])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out)?)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting iperf3: {e}")))?;
        let deadline = Instant::now() + self.plan.duration + CLIENT_GRACE;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let json = fs::read_to_string(&out)?;
        match (status, parse_iperf(&json)) {
            (Some(_), Ok(t)) => Ok(t),
            (None, _) => Err(CaseFailure::CouldNotRun(format!(
                "iperf3 did not finish within {:?}",
                self.plan.duration + CLIENT_GRACE
            ))),
            (Some(s), Err(e)) => Err(CaseFailure::CouldNotRun(format!("{e} ({s})"))),
        }
    }

    /// One round of one case.
    fn measure(&mut self, case: TcpCase, round: usize) -> Result<TcpRound, CaseFailure> {
        let loadavg_start = loadavg()?;
        let mux_ns = self.fleet.mux(1).clone();
        let nodes = match case {
            TcpCase::Kernel => {
                mux_ns.sysctl("net.ipv4.ip_forward", "1")?;
                None
            }
            TcpCase::Lb(io) => {
                let mux_config = self.mux_config(io).map_err(CaseFailure::CouldNotRun)?;
                let be = self.fleet.backend(1).clone();
                let agent_config = self.agent_config(io).map_err(CaseFailure::CouldNotRun)?;
                let agent = self.start(&be, "agent", "agent1", &agent_config)?;
                let mux = match self.start(&mux_ns, "mux", "mux1", &mux_config) {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = self.stop(&agent, "lb agent");
                        return Err(e);
                    }
                };
                // Let both settle before the clock starts.
                std::thread::sleep(Duration::from_millis(200));
                Some((mux, agent))
            }
        };
        let result = self.sample(nodes.as_ref(), round, case, loadavg_start);
        match &nodes {
            Some((mux, agent)) => {
                let mux_stopped = self.stop(mux, "lb mux");
                self.stop(agent, "lb agent")?;
                mux_stopped?;
            }
            None => mux_ns.sysctl("net.ipv4.ip_forward", "0")?,
        }
        result
    }

    fn sample(
        &mut self,
        nodes: Option<&(Node, Node)>,
        round: usize,
        case: TcpCase,
        loadavg_start: [f64; 3],
    ) -> Result<TcpRound, CaseFailure> {
        let cpu = |nodes: Option<&(Node, Node)>| -> io::Result<Option<(ProcessCpu, ProcessCpu)>> {
            nodes
                .map(|(m, a)| Ok((ProcessCpu::read(m.pid)?, ProcessCpu::read(a.pid)?)))
                .transpose()
        };
        let before = cpu(nodes)?;
        let started = Instant::now();
        let transfer = self.client(round, case.name())?;
        let wall = started.elapsed().as_secs_f64().max(1e-9);
        let after = cpu(nodes)?;
        let used = before
            .zip(after)
            .map(|((m0, a0), (m1, a1))| (m1.since(&m0).nanos, a1.since(&a0).nanos));
        let mux_io = match nodes {
            Some((mux, _)) => mux_status(&mux.socket)?.io,
            None => None,
        };
        let per_gb = |ns: u64| (transfer.bytes > 0).then(|| ns as f64 / transfer.bytes as f64);
        let percent = |ns: u64| ns as f64 / 1e9 / wall * 100.0;
        Ok(TcpRound {
            round,
            gbit_per_s: transfer.bits_per_second / 1e9,
            bytes: transfer.bytes,
            retransmits: transfer.retransmits,
            mux_cpu_s_per_gb: used.and_then(|(m, _)| per_gb(m)),
            agent_cpu_s_per_gb: used.and_then(|(_, a)| per_gb(a)),
            mux_cpu_percent: used.map(|(m, _)| percent(m)),
            agent_cpu_percent: used.map(|(_, a)| percent(a)),
            mux_io,
            loadavg_start,
            loadavg_end: loadavg()?,
        })
    }
}

/// The VIP both nodes load: TCP to iperf3's port on the VIP, GRE to be1.
fn vip_section() -> String {
    format!(
        "[[vip]]\nname = \"iperf\"\naddress = \"{}\"\nprotocol = \"tcp\"\nport = {PORT}\nencap = \"gre\"\n\
         [[vip.backend]]\naddress = \"{}\"\n",
        Fleet::VIP,
        Fleet::backend_address(1)
    )
}

/// Waits up to 5 s until something listens on TCP `port` in `ns`.
fn wait_listening(ns: &Namespace, port: u16) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let filter = format!("sport = :{port}");
    loop {
        let out = ns.exec_checked("ss", &["-Hltn", &filter])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "nothing listens on port {port} in {ns} after 5 s"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the plan with the `lb` binary at `lb`, reporting progress to `progress`.
pub fn run(
    plan: &TcpPlan,
    lb: &Path,
    progress: &mut dyn FnMut(&str),
) -> io::Result<Vec<TcpReport>> {
    require_root("lb bench tcp");
    let loadavg_start = loadavg()?;
    let mut lab = Lab::new("tcpb")?;
    let fleet = build(&mut lab)?;
    let be = fleet.backend(1).clone();
    let server = lab.spawn(
        &be,
        Command::new("iperf3")
            .args(["--server", "--bind"])
            .arg(Fleet::VIP.to_string())
            .args(["--port", &PORT.to_string()]),
    )?;
    if let Err(e) = wait_listening(&be, PORT) {
        return Err(io::Error::other(format!(
            "{e}; iperf3: {}",
            lab.log(server)
        )));
    }
    let mut bench = Bench {
        lab,
        fleet,
        plan,
        lb,
    };
    let mut cases: Vec<(TcpCase, TcpReport)> = plan
        .cases
        .iter()
        .map(|&c| {
            (
                c,
                TcpReport {
                    case: c.name(),
                    io: match c {
                        TcpCase::Lb(Some(io)) => Some(io.name()),
                        _ => None,
                    },
                    seconds: plan.duration.as_secs_f64(),
                    streams: plan.streams,
                    rounds: 0,
                    gbit_per_s: None,
                    ratio_to_kernel: None,
                    mux_cpu_s_per_gb: None,
                    agent_cpu_s_per_gb: None,
                    per_round: Vec::new(),
                    loadavg_start,
                    loadavg_end: loadavg_start,
                    mux_io: None,
                    error: None,
                },
            )
        })
        .collect();
    for round in 1..=plan.rounds {
        for (case, report) in &mut cases {
            if report.error.is_some() {
                continue;
            }
            match bench.measure(*case, round) {
                Ok(r) => {
                    progress(&format!(
                        "round {round}: {:<14} {:>6.2} Gbit/s{}{}",
                        report.case,
                        r.gbit_per_s,
                        r.retransmits
                            .map(|n| format!(", {n} retransmits"))
                            .unwrap_or_default(),
                        r.mux_cpu_percent
                            .zip(r.agent_cpu_percent)
                            .map(|(m, a)| format!(", mux {m:.0} % of a core, agent {a:.0} %"))
                            .unwrap_or_default(),
                    ));
                    report.per_round.push(r);
                }
                Err(CaseFailure::CouldNotRun(reason)) => {
                    progress(&format!(
                        "round {round}: {}: could not run: {reason}",
                        report.case
                    ));
                    report.error = Some(format!("round {round}: {reason}"));
                }
                Err(CaseFailure::Fatal(e)) => return Err(e),
            }
        }
    }
    let loadavg_end = loadavg()?;
    let kernel = cases
        .iter()
        .find(|(c, _)| *c == TcpCase::Kernel)
        .and_then(|(_, r)| median(&r.per_round.iter().map(|x| x.gbit_per_s).collect::<Vec<_>>()));
    Ok(cases
        .into_iter()
        .map(|(_, mut r)| {
            r.summarize(kernel);
            r.loadavg_end = loadavg_end;
            r
        })
        .collect())
}

/// The results as a Markdown table; cases that could not run are listed under it.
#[must_use]
pub fn table(cases: &[TcpReport]) -> String {
    let mut s = String::from(
        "| case | Gbit/s (median) | rounds | ratio to kernel | mux CPU s/GB | agent CPU s/GB |\n\
         | --- | --- | --- | --- | --- | --- |\n",
    );
    for c in cases.iter().filter(|c| !c.per_round.is_empty()) {
        let rounds: Vec<String> = c
            .per_round
            .iter()
            .map(|r| format!("{:.2}", r.gbit_per_s))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            c.case,
            crate::measure::figure(c.gbit_per_s, 2),
            rounds.join(", "),
            crate::measure::figure(c.ratio_to_kernel, 2),
            crate::measure::figure(c.mux_cpu_s_per_gb, 2),
            crate::measure::figure(c.agent_cpu_s_per_gb, 2),
        );
    }
    if let Some(c) = cases.first() {
        let _ = writeln!(
            s,
            "\niperf3, {} s per run, {} stream{}; load average {:.2} {:.2} {:.2} at the start, {:.2} {:.2} {:.2} at the end",
            c.seconds,
            c.streams,
            if c.streams == 1 { "" } else { "s" },
            c.loadavg_start[0],
            c.loadavg_start[1],
            c.loadavg_start[2],
            c.loadavg_end[0],
            c.loadavg_end[1],
            c.loadavg_end[2],
        );
    }
    for c in cases {
        if let Some(e) = &c.error {
            let _ = writeln!(s, "{}: could not run: {e}", c.case);
        } else if let Some(io) = &c.mux_io {
            let _ = writeln!(s, "{}: mux on {}", c.case, io.describe());
        }
    }
    s
}

/// One JSON object per case, one per line.
pub fn write_json(cases: &[TcpReport], out: &mut dyn io::Write) -> io::Result<()> {
    crate::measure::write_json_lines(cases, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf3_json_gives_the_received_rate_and_the_retransmits() {
        let json = r#"{"start":{},"intervals":[],"end":{
            "sum_sent":{"start":0,"end":2.0,"seconds":2.0,"bytes":250000000,"bits_per_second":1.0e9,"retransmits":7,"sender":true},
            "sum_received":{"start":0,"end":2.0,"seconds":2.0,"bytes":249000000,"bits_per_second":0.996e9,"sender":true}}}"#;
        assert_eq!(
            parse_iperf(json),
            Ok(Transfer {
                bits_per_second: 0.996e9,
                bytes: 249_000_000,
                retransmits: Some(7),
            })
        );
        let failed = r#"{"start":{},"intervals":[],"end":{},"error":"unable to connect to server: Connection refused"}"#;
        assert!(
            parse_iperf(failed)
                .unwrap_err()
                .contains("Connection refused")
        );
        assert!(parse_iperf("").is_err());
        assert!(
            parse_iperf(r#"{"end":{}}"#)
                .unwrap_err()
                .contains("sum_received")
        );
    }

    #[test]
    fn cases_parse_by_name() {
        for c in [
            TcpCase::Kernel,
            TcpCase::Lb(None),
            TcpCase::Lb(Some(Io::AfPacket)),
            TcpCase::Lb(Some(Io::AfXdp)),
        ] {
            assert_eq!(c.name().parse(), Ok(c));
        }
        assert!("mux".parse::<TcpCase>().is_err());
    }

    #[test]
    fn a_summary_is_the_median_and_the_ratio_to_the_kernel() {
        let round = |g: f64, cpu: Option<f64>| TcpRound {
            round: 1,
            gbit_per_s: g,
            bytes: 1,
            retransmits: Some(0),
            mux_cpu_s_per_gb: cpu,
            agent_cpu_s_per_gb: cpu,
            mux_cpu_percent: cpu,
            agent_cpu_percent: cpu,
            mux_io: None,
            loadavg_start: [0.0; 3],
            loadavg_end: [0.0; 3],
        };
        let mut r = TcpReport {
            case: "lb",
            io: None,
            seconds: 2.0,
            streams: 1,
            rounds: 0,
            gbit_per_s: None,
            ratio_to_kernel: None,
            mux_cpu_s_per_gb: None,
            agent_cpu_s_per_gb: None,
            per_round: vec![
                round(1.0, Some(3.0)),
                round(3.0, Some(1.0)),
                round(2.0, Some(2.0)),
            ],
            loadavg_start: [0.0; 3],
            loadavg_end: [0.0; 3],
            mux_io: None,
            error: None,
        };
        r.summarize(Some(4.0));
        assert_eq!(
            (r.rounds, r.gbit_per_s, r.ratio_to_kernel),
            (3, Some(2.0), Some(0.5))
        );
        assert_eq!(
            (r.mux_cpu_s_per_gb, r.agent_cpu_s_per_gb),
            (Some(2.0), Some(2.0))
        );
        assert!(table(&[r]).contains("| lb | 2.00 | 1.00, 3.00, 2.00 | 0.50 | 2.00 | 2.00 |"));
    }
}
