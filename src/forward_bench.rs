//! `lb bench forward`: packets per second delivered through `lb mux` against the Linux kernel's
//! own IP forwarding, on the same veth topology, measured in the same run.
//!
//! ```text
//!  sender s0 198.18.40.2 ── m-in 198.18.40.1 [mux] m-out 198.18.41.1 ── k0 198.18.41.2 sink
//! ```
//! - The sender blasts 64-byte UDP frames (Ethernet included, FCS excluded) to the VIP
//!   198.18.100.1, over `flows` source ports, with AF_PACKET `sendmmsg` ([`crate::blast`]).
//! - **kernel**: the mux namespace forwards (`ip_forward=1`, a route for the VIP via
//!   198.18.41.3).
//! - **lb mux, N workers**: `ip_forward=0`, `lb mux` on `m-in` encapsulates (IP-in-IP) to the
//!   backend 198.18.41.3.
//! - 198.18.41.3 is a static neighbour entry with the sink's MAC and not the sink's address, so
//!   the sink's kernel drops both kinds of packet the same cheap way. Delivered = the sink
//!   interface's received-packet counter.
//! - Cases alternate round by round (kernel, 1 worker, 2 workers, kernel, ...), so slow phases
//!   of this shared machine hit every case; the figure is each case's median and its ratio to
//!   the kernel's median.
//!
//! **Invariants.** Everything lives in namespaces the benchmark creates and removes (a
//! [`Lab`]); addresses are from 198.18.0.0/15; every sender run is bounded in time and packets;
//! only processes it started are signalled.

use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::blast;
use crate::netns::{Lab, Namespace, VethEnd, require_root};

const VIP: [u8; 4] = [198, 18, 100, 1];
const SENDER: [u8; 4] = [198, 18, 40, 2];
const BACKEND: &str = "198.18.41.3";

/// What to measure.
#[derive(Clone, Debug)]
pub struct ForwardPlan {
    /// How long each sender run lasts.
    pub duration: Duration,
    /// Rounds of every case.
    pub rounds: usize,
    /// Distinct flows (UDP source ports).
    pub flows: u16,
    /// Worker counts of `lb mux` to measure.
    pub workers: Vec<usize>,
}

impl Default for ForwardPlan {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(3),
            rounds: 3,
            flows: 1024,
            workers: vec![1, 2],
        }
    }
}

/// A measured case.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// `kernel` or `lb mux, N worker(s)`.
    pub case: String,
    /// Packets per second delivered at the sink, one per round.
    pub delivered_pps: Vec<f64>,
    /// Packets per second the sender got out, one per round.
    pub offered_pps: Vec<f64>,
}

impl CaseResult {
    /// The median delivered rate.
    #[must_use]
    pub fn median(&self) -> f64 {
        median(&self.delivered_pps)
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A 64-byte frame (60 bytes without FCS) from the sender to the VIP, UDP source port `sport`.
fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], sport: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total: u16 = 46;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&SENDER);
    ip[16..20].copy_from_slice(&VIP);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&26u16.to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    f.resize(60, 0);
    f
}

struct Topology {
    sender: Namespace,
    mux: Namespace,
    sink: Namespace,
    frames: Vec<Vec<u8>>,
}

fn build(lab: &mut Lab, flows: u16) -> io::Result<Topology> {
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
        "198.18.100.1/32",
        "via",
        BACKEND,
        "dev",
        "m-out",
    ])?;
    let mux_mac = mux.mac("m-in")?;
    let sender_mac = sender.mac("s0")?;
    let frames = (0..flows.max(1))
        .map(|i| frame(mux_mac, sender_mac, 10_000 + i))
        .collect();
    Ok(Topology {
        sender,
        mux,
        sink,
        frames,
    })
}

fn mux_config(dir: &Path, workers: usize) -> io::Result<std::path::PathBuf> {
    let path = dir.join(format!("forward-bench-{workers}.toml"));
    std::fs::write(
        &path,
        format!(
            "[node]\nname = \"bench\"\ninterface = \"m-in\"\naddress_v4 = \"198.18.41.1\"\n\
             workers = {workers}\nmtu = 1600\ncontrol_socket = {:?}\n\n\
             [[vip]]\nname = \"blast\"\naddress = \"198.18.100.1\"\nprotocol = \"udp\"\n\
             port = \"all\"\nencap = \"ipip\"\n  [[vip.backend]]\n  address = \"{BACKEND}\"\n",
            dir.join(format!("bench-{workers}.sock"))
        ),
    )?;
    Ok(path)
}

/// One sender run: (delivered pps, offered pps).
fn measure(t: &Topology, duration: Duration) -> io::Result<(f64, f64)> {
    let before = t.sink.rx_packets("k0")?;
    let frames = t.frames.clone();
    let sent = t
        .sender
        .enter(move || blast::blast("s0", &frames, duration, 50_000_000))
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))??;
    // Let the last packets drain through the mux.
    std::thread::sleep(Duration::from_millis(200));
    let after = t.sink.rx_packets("k0")?;
    let secs = sent.elapsed.as_secs_f64().max(1e-9);
    Ok(((after - before) as f64 / secs, sent.packets as f64 / secs))
}

/// Runs the plan with the `lb` binary at `lb`, reporting progress to `progress`.
pub fn run(
    plan: &ForwardPlan,
    lb: &Path,
    progress: &mut dyn FnMut(&str),
) -> io::Result<Vec<CaseResult>> {
    require_root("lb bench forward");
    let mut lab = Lab::new("fwd")?;
    let t = build(&mut lab, plan.flows)?;
    let mut cases = vec![CaseResult {
        case: "kernel".into(),
        delivered_pps: Vec::new(),
        offered_pps: Vec::new(),
    }];
    for &w in &plan.workers {
        cases.push(CaseResult {
            case: format!("lb mux, {w} worker{}", if w == 1 { "" } else { "s" }),
            delivered_pps: Vec::new(),
            offered_pps: Vec::new(),
        });
    }
    for round in 0..plan.rounds {
        for (i, case) in cases.iter_mut().enumerate() {
            let (delivered, offered) = if i == 0 {
                t.mux.sysctl("net.ipv4.ip_forward", "1")?;
                let r = measure(&t, plan.duration);
                t.mux.sysctl("net.ipv4.ip_forward", "0")?;
                r?
            } else {
                let workers = plan.workers[i - 1];
                let config = mux_config(lab.log_dir(), workers)?;
                let socket = lab.log_dir().join(format!("bench-{workers}.sock"));
                let pid = lab.spawn(
                    &t.mux,
                    Command::new(lb)
                        .args(["mux", "--no-metrics", "--config"])
                        .arg(&config)
                        .env("RUST_LOG", "warn"),
                )?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while !socket.exists() {
                    if Instant::now() > deadline || lab.wait(pid, Duration::ZERO).is_some() {
                        return Err(io::Error::other(format!(
                            "lb mux did not start: {}",
                            lab.log(pid)
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                std::thread::sleep(Duration::from_millis(200));
                let r = measure(&t, plan.duration);
                lab.signal(pid, libc::SIGTERM)?;
                let status = lab.wait(pid, Duration::from_secs(10));
                if status.is_none_or(|s| !s.success()) {
                    return Err(io::Error::other(format!(
                        "lb mux did not stop cleanly ({status:?}): {}",
                        lab.log(pid)
                    )));
                }
                r?
            };
            case.delivered_pps.push(delivered);
            case.offered_pps.push(offered);
            progress(&format!(
                "round {}: {:<20} delivered {:>10.0} pps (offered {:>10.0})",
                round + 1,
                case.case,
                delivered,
                offered
            ));
        }
    }
    Ok(cases)
}

/// The results as a Markdown table, with each case's ratio to the kernel.
#[must_use]
pub fn table(cases: &[CaseResult]) -> String {
    let kernel = cases.first().map_or(0.0, CaseResult::median);
    let mut s = String::from(
        "| case | delivered pps (median) | rounds | offered pps (median) | ratio to kernel |\n| --- | --- | --- | --- | --- |\n",
    );
    for c in cases {
        let rounds: Vec<String> = c.delivered_pps.iter().map(|p| format!("{p:.0}")).collect();
        let _ = writeln!(
            s,
            "| {} | {:.0} | {} | {:.0} | {:.2} |",
            c.case,
            c.median(),
            rounds.join(", "),
            median(&c.offered_pps),
            if kernel > 0.0 {
                c.median() / kernel
            } else {
                0.0
            }
        );
    }
    s
}
