//! `lb bench forward`: packets per second delivered through `lb mux` against the Linux kernel's
//! own IP forwarding, on the same veth topology, measured in the same run, with the mux's CPU
//! time per delivered packet and the frames its kernel dropped before it saw them.
//!
//! ```text
//!  sender s0 198.18.40.2 ══ m-in 198.18.40.1 [mux] m-out 198.18.41.1 ══ k0 198.18.41.2 sink
//! ```
//! - The sender is AF_XDP (one send-only socket per thread, on the lead's
//!   [`lb_dataplane::xdp::xsk`]) when it opens, else AF_PACKET `sendmmsg`. One AF_XDP thread
//!   offers 1.75–1.95 Mpps here beside a running mux, more than the mux forwards, so the mux,
//!   not the sender, is the bottleneck.
//! - Both veth pairs have [`QUEUES`] queues each way. The sender ([`crate::blast`]) runs one
//!   thread per transmit queue of `s0` it uses, and a veth delivers on the peer's receive
//!   queue of the same index; each flow stays on one queue. By default ([`sender_threads`])
//!   the kernel case's sender uses every queue (its forwarding runs in the sender threads'
//!   softirq, so that is how it gets both cores) and a mux case's one thread per worker (one
//!   thread already offers more than a worker forwards; a second would take the core the
//!   worker needs on a 2-core machine). `--sender-threads` sets one count for every case.
//! - Traffic: 64-byte UDP frames over `flows` source ports to the VIP 198.18.100.1, or with
//!   `new_flows` TCP SYNs of a new 5-tuple each (a SYN flood's new-flow rate).
//! - **kernel**: the mux namespace forwards (`ip_forward=1`, a route for the VIP via
//!   198.18.41.3). No mux process.
//! - **af_packet / af_xdp, N workers**: `ip_forward=0`, `lb mux` with `[node] io` set to the
//!   case's I/O on `m-in` encapsulates (IP-in-IP) to the backend 198.18.41.3. A case whose mux
//!   cannot start (its I/O unknown to this build, or refused by the kernel) is reported with
//!   the reason and not run again; the other cases go on.
//! - 198.18.41.3 is a static neighbour entry with the sink's MAC and not the sink's address, so
//!   the sink's kernel drops both kinds of packet the same cheap way. Delivered = the sink
//!   interface's received-packet counter.
//! - Per round of a mux case: the mux's CPU time over the sender's run and the drain after it
//!   ([`crate::measure::ProcessCpu`], every thread), divided by the packets delivered; its
//!   `kernel_drops` and `frames` counters from its control socket (`lb status`); per receive
//!   queue of `m-in`, the frames XDP saw (`ethtool -S`: veth counts them only while an XDP
//!   program is attached, so they are 0 for AF_PACKET).
//! - Cases alternate round by round (kernel, af_packet 1, af_packet 2, af_xdp 1, …), so slow
//!   phases of this shared machine hit every case; a case's figure is its median and its ratio
//!   to the kernel's median.
//!
//! **Invariants.** Everything lives in namespaces the benchmark creates and removes (a
//! [`Lab`]); addresses are from 198.18.0.0/15; every sender run is bounded in time and packets;
//! only processes it started are signalled.

use std::fmt::Write as _;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lb_core::config::Config;
use lb_dataplane::control::Request;
use lb_dataplane::socket::request;
use serde::{Deserialize, Serialize};

use crate::blast::{self, Endpoints, Limits, SenderKind, Traffic};
use crate::lab::live::wait_answering;
use crate::measure::{ProcessCpu, loadavg, median};
use crate::netns::{Lab, Namespace, VethEnd, require_root};

/// Transmit and receive queues of both veth pairs (every lab veth has them).
pub const QUEUES: usize = crate::netns::VETH_QUEUES as usize;
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
const SENDER: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 2);
const BACKEND: &str = "198.18.41.3";
/// The most frames one sender run may send.
const MAX_PACKETS: u64 = 50_000_000;
/// How long after the sender stops the counters are read: the mux drains its ring, and its
/// workers publish their counters (every 100 ms).
const DRAIN: Duration = Duration::from_millis(250);

/// The mux's packet I/O (`[node] io`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Io {
    /// AF_PACKET rings in, raw sockets out.
    AfPacket,
    /// AF_XDP sockets.
    AfXdp,
}

impl Io {
    /// The name in configs and output.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::AfPacket => "af_packet",
            Self::AfXdp => "af_xdp",
        }
    }
}

/// What forwards in a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarder {
    /// The kernel's IP forwarding.
    Kernel,
    /// `lb mux` with this I/O.
    Mux(Io),
}

impl Forwarder {
    /// The case's name: `kernel`, `af_packet`, `af_xdp`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Mux(io) => io.name(),
        }
    }
}

impl std::str::FromStr for Forwarder {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kernel" => Ok(Self::Kernel),
            "af_packet" => Ok(Self::Mux(Io::AfPacket)),
            "af_xdp" => Ok(Self::Mux(Io::AfXdp)),
            other => Err(format!(
                "unknown case {other:?}: kernel, af_packet or af_xdp"
            )),
        }
    }
}

/// Which sender to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SenderChoice {
    /// The fastest that opens.
    Auto,
    /// AF_PACKET `sendmmsg`.
    AfPacket,
    /// AF_XDP sockets (copy mode on veth).
    AfXdp,
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct ForwardPlan {
    /// How long each sender run lasts.
    pub duration: Duration,
    /// Rounds of every case.
    pub rounds: usize,
    /// What the sender sends.
    pub traffic: Traffic,
    /// The forwarders, in the order each round runs them.
    pub forwarders: Vec<Forwarder>,
    /// Worker counts of every mux forwarder.
    pub workers: Vec<usize>,
    /// The sender.
    pub sender: SenderChoice,
    /// Sender threads, 1 to [`QUEUES`] (thread `q` sends on queue `q`), for every case;
    /// `None`: per case ([`sender_threads`]).
    pub sender_threads: Option<usize>,
    /// The sender's rate cap (frames per second, all threads); `None`: as fast as it can.
    pub pps: Option<u64>,
}

impl Default for ForwardPlan {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(3),
            rounds: 3,
            traffic: Traffic::Flows(1024),
            forwarders: vec![
                Forwarder::Kernel,
                Forwarder::Mux(Io::AfPacket),
                Forwarder::Mux(Io::AfXdp),
            ],
            workers: vec![1, 2],
            sender: SenderChoice::Auto,
            sender_threads: None,
            pps: None,
        }
    }
}

/// One round of one case.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Round {
    /// 1, 2, …
    pub round: usize,
    /// Frames per second the sender got out.
    pub offered_pps: f64,
    /// Frames per second the sink received.
    pub delivered_pps: f64,
    /// The mux's CPU time (all threads) over the run and its drain, per delivered packet.
    pub mux_cpu_ns_per_packet: Option<f64>,
    /// Mux threads that ended during the window (their time after its start is missing).
    pub mux_threads_vanished: Option<usize>,
    /// Frames the mux's kernel dropped before a worker saw them (its `kernel_drops` counter).
    pub kernel_drops: Option<u64>,
    /// Frames the mux's workers received (its `frames` counter).
    pub mux_frames: Option<u64>,
    /// Packets the mux sent on the raw-socket path instead of AF_XDP (`tx_slow_path`).
    pub tx_slow_path: Option<u64>,
    /// The mux's I/O as its status showed it.
    pub mux_io: Option<IoInForce>,
    /// Per receive queue of `m-in`, frames XDP saw (0 without an XDP program).
    pub rx_queue_xdp_packets: Vec<u64>,
    /// Load average when the round started.
    pub loadavg_start: [f64; 3],
    /// Load average when the round ended.
    pub loadavg_end: [f64; 3],
}

/// A measured case: one JSON object of `lb bench forward --json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CaseReport {
    /// `kernel`, `af_packet` or `af_xdp`.
    pub case: &'static str,
    /// The mux's workers (`null` for the kernel).
    pub workers: Option<usize>,
    /// `flows` (steady UDP flows) or `new_flows` (a SYN of a new 5-tuple each).
    pub traffic: &'static str,
    /// Distinct flows of `flows` traffic.
    pub flows: Option<u16>,
    /// The sender in use (`af_packet`, `af_xdp`).
    pub sender: &'static str,
    /// Why the sender is not the one asked for, if it is not.
    pub sender_note: Option<String>,
    /// Its threads (one per transmit queue).
    pub sender_threads: usize,
    /// The sender's rate cap, if any.
    pub pps_cap: Option<u64>,
    /// Seconds per sender run.
    pub seconds: f64,
    /// Rounds measured.
    pub rounds: usize,
    /// Median offered frames per second.
    pub offered_pps: Option<f64>,
    /// Median delivered frames per second.
    pub delivered_pps: Option<f64>,
    /// Median delivered over the kernel case's median delivered.
    pub ratio_to_kernel: Option<f64>,
    /// Median of the rounds' mux CPU nanoseconds per delivered packet.
    pub mux_cpu_ns_per_packet: Option<f64>,
    /// The mux's kernel drops, summed over the rounds.
    pub kernel_drops: Option<u64>,
    /// Every round.
    pub per_round: Vec<Round>,
    /// Load average when the benchmark started.
    pub loadavg_start: [f64; 3],
    /// Load average when it ended.
    pub loadavg_end: [f64; 3],
    /// The mux's I/O in force, as its status showed it in the last round.
    pub mux_io: Option<IoInForce>,
    /// Why the case could not run (from the round named in it on).
    pub error: Option<String>,
}

impl CaseReport {
    /// The case's name for the text table: `kernel`, `af_packet, 2 workers`.
    #[must_use]
    pub fn label(&self) -> String {
        match self.workers {
            None => self.case.to_owned(),
            Some(w) => format!("{}, {w} worker{}", self.case, if w == 1 { "" } else { "s" }),
        }
    }

    fn summarize(&mut self, kernel: Option<f64>) {
        let of = |f: fn(&Round) -> Option<f64>| {
            median(&self.per_round.iter().filter_map(f).collect::<Vec<_>>())
        };
        self.rounds = self.per_round.len();
        self.mux_io = self.per_round.iter().rev().find_map(|r| r.mux_io.clone());
        self.offered_pps = of(|r| Some(r.offered_pps));
        self.delivered_pps = of(|r| Some(r.delivered_pps));
        self.mux_cpu_ns_per_packet = of(|r| r.mux_cpu_ns_per_packet);
        self.kernel_drops = self
            .per_round
            .iter()
            .map(|r| r.kernel_drops)
            .sum::<Option<u64>>()
            .filter(|_| !self.per_round.is_empty());
        self.ratio_to_kernel = match (self.delivered_pps, kernel) {
            (Some(d), Some(k)) if k > 0.0 => Some(d / k),
            _ => None,
        };
    }
}

/// The benchmark's namespaces and the frames' addresses.
struct Topology {
    sender: Namespace,
    mux: Namespace,
    sink: Namespace,
    endpoints: Endpoints,
}

fn build(lab: &mut Lab) -> io::Result<Topology> {
    let sender = lab.namespace("snd")?;
    let mux = lab.namespace("mux")?;
    let sink = lab.namespace("sink")?;
    lab.veth(
        VethEnd::new(&sender, "s0", "198.18.40.2/24"),
        VethEnd::new(&mux, "m-in", "198.18.40.1/24"),
        1600,
    )?;
    lab.veth(
        VethEnd::new(&mux, "m-out", "198.18.41.1/24"),
        VethEnd::new(&sink, "k0", "198.18.41.2/24"),
        1600,
    )?;
    let sink_mac = sink.mac("k0")?;
    let mac_text: Vec<String> = sink_mac.iter().map(|b| format!("{b:02x}")).collect();
    mux.ip(&[
        "neigh",
        "replace",
        BACKEND,
        "lladdr",
        &mac_text.join(":"),
        "dev",
        "m-out",
        "nud",
        "permanent",
    ])?;
    mux.ip(&[
        "route",
        "add",
        &format!("{VIP}/32"),
        "via",
        BACKEND,
        "dev",
        "m-out",
    ])?;
    let endpoints = Endpoints {
        src_mac: sender.mac("s0")?,
        dst_mac: mux.mac("m-in")?,
        src: SENDER,
        dst: VIP,
    };
    Ok(Topology {
        sender,
        mux,
        sink,
        endpoints,
    })
}

/// The mux's config for `io` and `workers` (see [`config_with_io`]).
fn mux_config(io: Io, workers: usize, traffic: Traffic, socket: &Path) -> Result<String, String> {
    let protocol = match traffic {
        Traffic::Flows(_) => "udp",
        Traffic::NewFlows => "tcp",
    };
    config_with_io(
        Some(io),
        "the forwarding benchmark's mux config",
        |io_line| {
            format!(
                "[node]\nname = \"bench\"\ninterface = \"m-in\"\naddress_v4 = \"198.18.41.1\"\n\
             workers = {workers}\nmtu = 1600\ncontrol_socket = {socket:?}\n{io_line}\n\
             [[vip]]\nname = \"blast\"\naddress = \"{VIP}\"\nprotocol = \"{protocol}\"\n\
             port = \"all\"\nencap = \"ipip\"\n  [[vip.backend]]\n  address = \"{BACKEND}\"\n"
            )
        },
    )
}

/// A config that `text` writes with `[node] io` set to `io` (its `io = ...` line is given to
/// `text`; none for `None`, the build's default), checked by this build's config reader. An
/// error is why the config cannot be used.
pub(crate) fn config_with_io(
    io: Option<Io>,
    origin: &str,
    text: impl Fn(&str) -> String,
) -> Result<String, String> {
    let config = text(
        &io.map(|io| format!("io = \"{}\"\n", io.name()))
            .unwrap_or_default(),
    );
    match Config::from_toml(&config, origin) {
        Ok(_) => Ok(config),
        Err(e) => Err(format!("the config is refused: {e}")),
    }
}

/// The part of a mux's status answer the benchmark reads.
#[derive(Debug, Deserialize)]
pub(crate) struct StatusAnswer {
    counters: StatusCounters,
    pub(crate) io: Option<IoInForce>,
}

#[derive(Debug, Deserialize)]
struct StatusCounters {
    frames: u64,
    kernel_drops: u64,
    #[serde(default)]
    tx_slow_path: u64,
}

/// The mux's packet I/O as its status shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct IoInForce {
    /// `af_xdp` or `af_packet`.
    pub mode: String,
    /// AF_XDP: `driver` or `skb`.
    #[serde(default)]
    pub attach: Option<String>,
    /// AF_XDP: `zero_copy` or `copy`.
    #[serde(default)]
    pub bind: Option<String>,
    /// AF_XDP: receive queues with a socket.
    #[serde(default)]
    pub queues: Option<u32>,
    /// Why a preferred mode is not in force.
    #[serde(default)]
    pub fallbacks: Vec<String>,
}

pub(crate) fn mux_status(socket: &Path) -> io::Result<StatusAnswer> {
    let request_value = serde_json::to_value(Request::Status).map_err(io::Error::other)?;
    let answer = request(socket, &request_value)?;
    serde_json::from_value(answer.clone()).map_err(|e| {
        io::Error::other(format!(
            "the mux's status answer lacks counters ({e}): {answer}"
        ))
    })
}

/// Per receive queue of `ifname`, frames XDP saw (`rx_queue_N_xdp_packets` of `ethtool -S`).
fn rx_queue_xdp_packets(ns: &Namespace, ifname: &str) -> io::Result<Vec<u64>> {
    Ok(parse_queue_counters(
        &ns.exec_checked("ethtool", &["-S", ifname])?,
    ))
}

/// `rx_queue_N_xdp_packets` of an `ethtool -S` text, by queue.
fn parse_queue_counters(text: &str) -> Vec<u64> {
    let mut queues = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        if let Some(q) = key
            .strip_prefix("rx_queue_")
            .and_then(|k| k.strip_suffix("_xdp_packets"))
            .and_then(|q| q.parse::<usize>().ok())
            && let Ok(v) = value.trim().parse::<u64>()
        {
            if queues.len() <= q {
                queues.resize(q + 1, 0);
            }
            queues[q] = v;
        }
    }
    queues
}

impl IoInForce {
    /// `af_xdp (driver, copy, 2 queues); <fallbacks>`.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = [&self.attach, &self.bind]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        parts.extend(
            self.queues
                .map(|q| format!("{q} queue{}", if q == 1 { "" } else { "s" })),
        );
        let mut s = self.mode.clone();
        if !parts.is_empty() {
            s = format!("{s} ({})", parts.join(", "));
        }
        for f in &self.fallbacks {
            s = format!("{s}; {f}");
        }
        s
    }
}

/// A mux running for one round.
struct RunningMux {
    pid: u32,
    socket: PathBuf,
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

/// The benchmark's lab and what every round needs.
struct Bench<'a> {
    lab: Lab,
    t: Topology,
    plan: &'a ForwardPlan,
    sender: SenderKind,
    lb: &'a Path,
}

impl Bench<'_> {
    fn start_mux(&mut self, io: Io, workers: usize) -> Result<RunningMux, CaseFailure> {
        let lab = &mut self.lab;
        let name = format!("{}-{workers}", io.name());
        let socket = lab.log_dir().join(format!("{name}.sock"));
        let text = mux_config(io, workers, self.plan.traffic, &socket)
            .map_err(CaseFailure::CouldNotRun)?;
        let path = lab.log_dir().join(format!("{name}.toml"));
        std::fs::write(&path, text)?;
        let pid = lab.spawn(
            &self.t.mux,
            Command::new(self.lb)
                .args(["mux", "--no-metrics", "--config"])
                .arg(&path)
                .env("RUST_LOG", "warn"),
        )?;
        if let Err(e) = wait_answering(lab, pid, &socket, "lb mux") {
            if lab.running(pid) {
                let _ = lab.signal(pid, libc::SIGKILL);
                lab.wait(pid, Duration::from_secs(5));
            }
            return Err(CaseFailure::CouldNotRun(e.to_string()));
        }
        Ok(RunningMux { pid, socket })
    }

    fn stop_mux(&mut self, mux: &RunningMux) -> Result<(), CaseFailure> {
        let lab = &mut self.lab;
        lab.signal(mux.pid, libc::SIGTERM)?;
        let status = lab.wait(mux.pid, Duration::from_secs(10));
        if status.is_none_or(|s| !s.success()) {
            if status.is_none() {
                let _ = lab.signal(mux.pid, libc::SIGKILL);
                lab.wait(mux.pid, Duration::from_secs(5));
            }
            return Err(CaseFailure::CouldNotRun(format!(
                "lb mux did not stop cleanly ({status:?}): {}",
                lab.log(mux.pid)
            )));
        }
        Ok(())
    }

    /// One round of one case.
    fn measure(
        &mut self,
        forwarder: Forwarder,
        workers: Option<usize>,
        round: usize,
    ) -> Result<Round, CaseFailure> {
        let loadavg_start = loadavg()?;
        let mux = match (forwarder, workers) {
            (Forwarder::Mux(io), Some(w)) => Some(self.start_mux(io, w)?),
            _ => {
                self.t.mux.sysctl("net.ipv4.ip_forward", "1")?;
                None
            }
        };
        let threads = sender_threads(self.plan.sender_threads, forwarder, workers);
        let result = self.sample(mux.as_ref(), round, threads, loadavg_start);
        match &mux {
            Some(m) => self.stop_mux(m)?,
            None => self.t.mux.sysctl("net.ipv4.ip_forward", "0")?,
        }
        result
    }

    /// The sender's run and the counters around it, with `mux` (if any) running.
    fn sample(
        &self,
        mux: Option<&RunningMux>,
        round: usize,
        threads: usize,
        loadavg_start: [f64; 3],
    ) -> Result<Round, CaseFailure> {
        let t = &self.t;
        if mux.is_some() {
            // Let the mux settle (rings mapped, program attached) before the clock starts.
            std::thread::sleep(Duration::from_millis(200));
        }
        let status_before = mux.map(|m| mux_status(&m.socket)).transpose()?;
        let queues_before = rx_queue_xdp_packets(&t.mux, "m-in")?;
        let cpu_before = mux.map(|m| ProcessCpu::read(m.pid)).transpose()?;
        let rx_before = t.sink.rx_packets("k0")?;
        let sent = blast::run(
            self.sender,
            &t.sender,
            "s0",
            t.endpoints,
            self.plan.traffic,
            threads,
            Limits {
                duration: self.plan.duration,
                max_packets: MAX_PACKETS,
                pps: self.plan.pps,
            },
        )?;
        std::thread::sleep(DRAIN);
        let rx_after = t.sink.rx_packets("k0")?;
        let cpu_after = mux.map(|m| ProcessCpu::read(m.pid)).transpose()?;
        let status_after = mux.map(|m| mux_status(&m.socket)).transpose()?;
        let queues_after = rx_queue_xdp_packets(&t.mux, "m-in")?;
        let delivered = rx_after.saturating_sub(rx_before);
        let secs = sent.elapsed.as_secs_f64().max(1e-9);
        let cpu = cpu_before
            .zip(cpu_after)
            .map(|(before, after)| after.since(&before));
        let io = status_after.as_ref().and_then(|s| s.io.clone());
        let counters = status_before
            .zip(status_after)
            .map(|(b, a)| (b.counters, a.counters));
        Ok(Round {
            round,
            offered_pps: sent.pps(),
            delivered_pps: delivered as f64 / secs,
            mux_cpu_ns_per_packet: cpu
                .filter(|_| delivered > 0)
                .map(|c| c.nanos as f64 / delivered as f64),
            mux_threads_vanished: cpu.map(|c| c.vanished),
            kernel_drops: counters
                .as_ref()
                .map(|(b, a)| a.kernel_drops.saturating_sub(b.kernel_drops)),
            mux_frames: counters
                .as_ref()
                .map(|(b, a)| a.frames.saturating_sub(b.frames)),
            tx_slow_path: counters
                .as_ref()
                .map(|(b, a)| a.tx_slow_path.saturating_sub(b.tx_slow_path)),
            mux_io: io,
            rx_queue_xdp_packets: queues_after
                .iter()
                .enumerate()
                .map(|(q, a)| a.saturating_sub(queues_before.get(q).copied().unwrap_or(0)))
                .collect(),
            loadavg_start,
            loadavg_end: loadavg()?,
        })
    }
}

/// The sender threads of a case: `fixed`, or all [`QUEUES`] for the kernel (its forwarding
/// runs in the sender threads' softirq) and one per worker for a mux, up to [`QUEUES`] (one
/// thread offers more than a worker forwards; more would take the worker's core).
#[must_use]
pub fn sender_threads(fixed: Option<usize>, forwarder: Forwarder, workers: Option<usize>) -> usize {
    fixed.unwrap_or(match forwarder {
        Forwarder::Kernel => QUEUES,
        Forwarder::Mux(_) => workers.unwrap_or(1).clamp(1, QUEUES),
    })
}

/// The sender `choice` resolves to, and a note when it is not the one asked for: `auto` is
/// AF_XDP when a socket opens on the sender's veth, else AF_PACKET; an AF_XDP
/// sender asked for that does not open is an error.
fn resolve_sender(choice: SenderChoice, t: &Topology) -> io::Result<(SenderKind, Option<String>)> {
    match choice {
        SenderChoice::AfPacket => Ok((SenderKind::AfPacket, None)),
        SenderChoice::AfXdp => {
            blast::af_xdp_opens(&t.sender, "s0")?;
            Ok((SenderKind::AfXdp, None))
        }
        SenderChoice::Auto => Ok(match blast::af_xdp_opens(&t.sender, "s0") {
            Ok(()) => (SenderKind::AfXdp, None),
            Err(e) => (
                SenderKind::AfPacket,
                Some(format!(
                    "the AF_XDP sender did not open ({e}): AF_PACKET sendmmsg"
                )),
            ),
        }),
    }
}

/// Runs the plan with the `lb` binary at `lb`, reporting progress to `progress`.
pub fn run(
    plan: &ForwardPlan,
    lb: &Path,
    progress: &mut dyn FnMut(&str),
) -> io::Result<Vec<CaseReport>> {
    require_root("lb bench forward");
    if let Some(n) = plan.sender_threads
        && !(1..=QUEUES).contains(&n)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("sender threads {n}: 1 to {QUEUES}"),
        ));
    }
    let loadavg_start = loadavg()?;
    let mut lab = Lab::new("fwd")?;
    let t = build(&mut lab)?;
    let (sender, sender_note) = resolve_sender(plan.sender, &t)?;
    let mut bench = Bench {
        lab,
        t,
        plan,
        sender,
        lb,
    };
    if let Some(n) = &sender_note {
        progress(&format!("sender: {n}"));
    }
    let mut cases: Vec<(Forwarder, CaseReport)> = Vec::new();
    for &f in &plan.forwarders {
        let workers: Vec<Option<usize>> = match f {
            Forwarder::Kernel => vec![None],
            Forwarder::Mux(_) => plan.workers.iter().map(|&w| Some(w)).collect(),
        };
        for w in workers {
            cases.push((
                f,
                CaseReport {
                    case: f.name(),
                    workers: w,
                    traffic: match plan.traffic {
                        Traffic::Flows(_) => "flows",
                        Traffic::NewFlows => "new_flows",
                    },
                    flows: match plan.traffic {
                        Traffic::Flows(n) => Some(n),
                        Traffic::NewFlows => None,
                    },
                    sender: sender.name(),
                    sender_threads: sender_threads(plan.sender_threads, f, w),
                    pps_cap: plan.pps,
                    seconds: plan.duration.as_secs_f64(),
                    rounds: 0,
                    offered_pps: None,
                    delivered_pps: None,
                    ratio_to_kernel: None,
                    mux_cpu_ns_per_packet: None,
                    kernel_drops: None,
                    per_round: Vec::new(),
                    loadavg_start,
                    loadavg_end: loadavg_start,
                    sender_note: sender_note.clone(),
                    mux_io: None,
                    error: None,
                },
            ));
        }
    }
    for round in 1..=plan.rounds {
        for (forwarder, case) in &mut cases {
            if case.error.is_some() {
                continue;
            }
            match bench.measure(*forwarder, case.workers, round) {
                Ok(r) => {
                    progress(&format!(
                        "round {round}: {:<22} delivered {:>10.0} pps (offered {:>10.0}){}{}",
                        case.label(),
                        r.delivered_pps,
                        r.offered_pps,
                        r.mux_cpu_ns_per_packet
                            .map(|c| format!(", mux {c:.0} ns/packet"))
                            .unwrap_or_default(),
                        r.kernel_drops
                            .filter(|&d| d > 0)
                            .map(|d| format!(", {d} kernel drops"))
                            .unwrap_or_default(),
                    ));
                    case.per_round.push(r);
                }
                Err(CaseFailure::CouldNotRun(reason)) => {
                    progress(&format!(
                        "round {round}: {}: could not run: {reason}",
                        case.label()
                    ));
                    case.error = Some(format!("round {round}: {reason}"));
                }
                Err(CaseFailure::Fatal(e)) => return Err(e),
            }
        }
    }
    let loadavg_end = loadavg()?;
    let kernel = cases
        .iter()
        .find(|(f, _)| *f == Forwarder::Kernel)
        .and_then(|(_, c)| {
            median(
                &c.per_round
                    .iter()
                    .map(|r| r.delivered_pps)
                    .collect::<Vec<_>>(),
            )
        });
    Ok(cases
        .into_iter()
        .map(|(_, mut c)| {
            c.summarize(kernel);
            c.loadavg_end = loadavg_end;
            c
        })
        .collect())
}

/// The results as a Markdown table, with each case's ratio to the kernel; cases that could not
/// run are listed under it with the reason.
#[must_use]
pub fn table(cases: &[CaseReport]) -> String {
    let mut s = String::from(
        "| case | sender threads | delivered pps (median) | rounds | offered pps (median) | ratio to kernel | mux CPU ns/packet | kernel drops |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for c in cases.iter().filter(|c| !c.per_round.is_empty()) {
        let rounds: Vec<String> = c
            .per_round
            .iter()
            .map(|r| format!("{:.0}", r.delivered_pps))
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            c.label(),
            c.sender_threads,
            crate::measure::figure(c.delivered_pps, 0),
            rounds.join(", "),
            crate::measure::figure(c.offered_pps, 0),
            crate::measure::figure(c.ratio_to_kernel, 2),
            crate::measure::figure(c.mux_cpu_ns_per_packet, 0),
            c.kernel_drops
                .map_or_else(|| "–".to_owned(), |d| d.to_string()),
        );
    }
    if let Some(c) = cases.first() {
        let _ = writeln!(
            s,
            "\nsender: {}{}{}; load average {:.2} {:.2} {:.2} at the start, {:.2} {:.2} {:.2} at the end",
            c.sender,
            c.pps_cap
                .map(|p| format!(", capped at {p} pps"))
                .unwrap_or_default(),
            c.sender_note
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default(),
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
            let _ = writeln!(s, "{}: could not run: {e}", c.label());
        } else if let Some(io) = &c.mux_io {
            let _ = writeln!(s, "{}: {}", c.label(), io.describe());
        }
    }
    s
}

/// One JSON object per case, one per line.
pub fn write_json(cases: &[CaseReport], out: &mut dyn io::Write) -> io::Result<()> {
    crate::measure::write_json_lines(cases, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(delivered: f64, cpu: Option<f64>, drops: Option<u64>) -> Round {
        Round {
            round: 1,
            offered_pps: delivered * 1.5,
            delivered_pps: delivered,
            mux_cpu_ns_per_packet: cpu,
            mux_threads_vanished: cpu.map(|_| 0),
            kernel_drops: drops,
            mux_frames: drops.map(|_| 10),
            tx_slow_path: drops.map(|_| 0),
            mux_io: None,
            rx_queue_xdp_packets: vec![0, 0],
            loadavg_start: [0.5, 0.4, 0.3],
            loadavg_end: [0.6, 0.4, 0.3],
        }
    }

    fn case(name: &'static str, workers: Option<usize>, rounds: Vec<Round>) -> CaseReport {
        CaseReport {
            case: name,
            workers,
            traffic: "flows",
            flows: Some(64),
            sender: "af_packet",
            sender_note: None,
            sender_threads: 2,
            pps_cap: None,
            seconds: 1.0,
            rounds: 0,
            offered_pps: None,
            delivered_pps: None,
            ratio_to_kernel: None,
            mux_cpu_ns_per_packet: None,
            kernel_drops: None,
            per_round: rounds,
            loadavg_start: [0.5, 0.4, 0.3],
            loadavg_end: [0.5, 0.4, 0.3],
            mux_io: None,
            error: None,
        }
    }

    #[test]
    fn a_case_summary_is_its_medians_its_drops_and_its_ratio_to_the_kernel() {
        let mut mux = case(
            "af_packet",
            Some(1),
            vec![
                round(100.0, Some(3000.0), Some(5)),
                round(300.0, Some(1000.0), Some(0)),
                round(200.0, Some(2000.0), Some(1)),
            ],
        );
        mux.summarize(Some(400.0));
        assert_eq!(mux.rounds, 3);
        assert_eq!(mux.delivered_pps, Some(200.0));
        assert_eq!(mux.offered_pps, Some(300.0));
        assert_eq!(mux.mux_cpu_ns_per_packet, Some(2000.0));
        assert_eq!(mux.kernel_drops, Some(6));
        assert_eq!(mux.ratio_to_kernel, Some(0.5));

        let mut kernel = case("kernel", None, vec![round(400.0, None, None)]);
        kernel.summarize(Some(400.0));
        assert_eq!(kernel.kernel_drops, None);
        assert_eq!(kernel.mux_cpu_ns_per_packet, None);
        assert_eq!(kernel.ratio_to_kernel, Some(1.0));

        let mut skipped = case("af_xdp", Some(2), Vec::new());
        skipped.error = Some("round 1: no".into());
        skipped.summarize(Some(400.0));
        assert_eq!(skipped.rounds, 0);
        assert_eq!(
            (
                skipped.delivered_pps,
                skipped.kernel_drops,
                skipped.ratio_to_kernel
            ),
            (None, None, None)
        );
        let text = table(&[kernel, mux, skipped]);
        assert!(
            text.contains(
                "| af_packet, 1 worker | 2 | 200 | 100, 300, 200 | 300 | 0.50 | 2000 | 6 |"
            ),
            "{text}"
        );
        assert!(
            text.contains("af_xdp, 2 workers: could not run: round 1: no"),
            "{text}"
        );
    }

    #[test]
    fn a_case_sends_on_the_queues_its_forwarder_serves_unless_told() {
        let xdp = Forwarder::Mux(Io::AfXdp);
        assert_eq!(sender_threads(None, Forwarder::Kernel, None), QUEUES);
        assert_eq!(sender_threads(None, xdp, Some(1)), 1);
        assert_eq!(sender_threads(None, xdp, Some(2)), 2.min(QUEUES));
        assert_eq!(sender_threads(None, xdp, Some(8)), QUEUES);
        assert_eq!(sender_threads(Some(1), Forwarder::Kernel, None), 1);
        assert_eq!(sender_threads(Some(2), xdp, Some(1)), 2);
    }

    #[test]
    fn cases_parse_by_name() {
        assert_eq!("kernel".parse(), Ok(Forwarder::Kernel));
        assert_eq!("af_xdp".parse(), Ok(Forwarder::Mux(Io::AfXdp)));
        assert!("xdp".parse::<Forwarder>().is_err());
    }

    #[test]
    fn every_case_config_loads_with_its_io_and_workers() {
        use lb_core::config::IoMode;
        for (io, mode) in [(Io::AfPacket, IoMode::AfPacket), (Io::AfXdp, IoMode::AfXdp)] {
            let text = mux_config(io, 2, Traffic::Flows(8), Path::new("/tmp/x.sock")).unwrap();
            let config = Config::from_toml(&text, "test").unwrap();
            assert_eq!((config.node.workers, config.node.io), (2, mode));
        }
        let tcp = mux_config(Io::AfPacket, 1, Traffic::NewFlows, Path::new("/tmp/x.sock")).unwrap();
        assert!(tcp.contains("protocol = \"tcp\""));
        let refused = config_with_io(Some(Io::AfXdp), "test", |io| {
            format!("[node]\n{io}bogus = 1\n")
        });
        assert!(refused.unwrap_err().contains("bogus"));
    }

    #[test]
    fn ethtool_queue_counters_are_read_per_queue() {
        // The parser, on the format of veth's `ethtool -S`.
        let text = "NIC statistics:\n     peer_ifindex: 2\n     rx_queue_0_xdp_packets: 7\n     rx_queue_0_xdp_bytes: 420\n     rx_queue_1_xdp_packets: 9\n";
        assert_eq!(parse_queue_counters(text), vec![7, 9]);
    }
}
