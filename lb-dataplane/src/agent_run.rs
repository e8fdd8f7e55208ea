//! `lb agent` as a process: the receive loop around [`crate::agent::classify`], the TUN, the
//! chaining transmitter, the control socket and the metrics.
//!
//! One thread receives (an AF_PACKET ring on `node.interface`), decides, writes delivered
//! packets into the TUN and queues chained ones, flushing them once per batch. Counters are
//! published every [`crate::worker::REPORT_INTERVAL`] for `lb status` and metrics.
//!
//! **Invariants.** The receive loop never waits for a reader of its counters (`try_lock`);
//! a positive sock_diag answer is cached, so a connection costs one netlink round trip, not one
//! per packet; SIGTERM/SIGINT stop it after its batch, exit 0.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use lb_core::config::Config;
use lb_core::encap::{EncapKind, EncapParams, encapsulate};
use lb_core::packet;
use serde_json::{Value, json};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::afpacket::{AfPacketReceiver, RingConfig};
use crate::agent::{Policy, Reject, Verdict, classify};
use crate::device::{Receiver, Transmitter};
use crate::rawip::RawIpTransmitter;
use crate::sockdiag::SockDiag;
use crate::socket::{ControlHandler, ControlSocket};
use crate::tun::Tun;
use crate::worker::{BATCH_FRAMES, POLL_TIMEOUT, REPORT_INTERVAL};

/// Command-line overrides of `lb agent`.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// The config file.
    pub config: PathBuf,
    /// Overrides `node.control_socket`.
    pub control_socket: Option<PathBuf>,
    /// Overrides `node.metrics_address`.
    pub metrics_address: Option<SocketAddr>,
    /// Do not start the metrics exporter.
    pub no_metrics: bool,
}

/// The agent's counters, cumulative.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentCounters {
    /// Frames received on the interface.
    pub frames: u64,
    /// Inner packets written into the TUN.
    pub delivered: u64,
    /// Of those, packets that named a previous backend this host does not know.
    pub delivered_unknown_previous: u64,
    /// Packets sent on to their previous backend (daisy chaining).
    pub chained: u64,
    /// Packets another backend chained here, delivered.
    pub delivered_chained: u64,
    /// Rejected tunnel packets, indexed as [`Reject::ALL`].
    pub rejected: [u64; Reject::ALL.len()],
    /// TUN writes that failed.
    pub tun_errors: u64,
    /// Chained packets the kernel refused to send.
    pub chain_send_failed: u64,
    /// sock_diag queries made.
    pub connection_lookups: u64,
}

struct Shared {
    name: String,
    addresses: Vec<IpAddr>,
    muxes: Vec<String>,
    tun: String,
    counters: Mutex<AgentCounters>,
    heartbeat: Mutex<Option<Instant>>,
    shutdown: AtomicBool,
}

impl ControlHandler for Shared {
    fn handle_line(&self, line: &str) -> Value {
        match serde_json::from_str::<Value>(line) {
            Ok(v) if v["command"] == "status" => self.status(),
            Ok(v) => {
                json!({"ok": false, "error": format!("unknown command {}; the agent answers \"status\"", v["command"])})
            }
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        }
    }

    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn status(&self) -> Value {
        let c = *self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let last_seen = self
            .heartbeat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|h| h.elapsed());
        // Healthy: the receive loop went round within the last second.
        let healthy = last_seen.is_some_and(|d| d < Duration::from_secs(1));
        let rejected: serde_json::Map<String, Value> = Reject::ALL
            .iter()
            .zip(c.rejected)
            .map(|(r, n)| (r.name().to_owned(), json!(n)))
            .collect();
        json!({
            "ok": true,
            "role": "agent",
            "node": self.name,
            "addresses": self.addresses,
            "muxes": self.muxes,
            "tun": self.tun,
            "healthy": healthy,
            "last_seen_ms": last_seen.map(|d| d.as_millis() as u64),
            "counters": {
                "frames": c.frames,
                "delivered": c.delivered,
                "delivered_unknown_previous": c.delivered_unknown_previous,
                "chained": c.chained,
                "delivered_chained": c.delivered_chained,
                "rejected": rejected,
                "tun_errors": c.tun_errors,
                "chain_send_failed": c.chain_send_failed,
                "connection_lookups": c.connection_lookups,
            },
        })
    }
}

/// Raw sockets for the tunnel protocols that accept nothing: while they exist the kernel does
/// not answer tunnel packets with ICMP "protocol unreachable".
fn quiet_tunnel_protocols() -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        for protocol in [4, 41, 47] {
            // SAFETY: plain socket(2); the result is checked before use.
            let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
            if fd < 0 {
                continue;
            }
            // SAFETY: `fd` is a fresh descriptor this function owns from here on.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // One classic BPF instruction: return 0 (accept nothing).
            let mut drop_all = libc::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k: 0,
            };
            let program = libc::sock_fprog {
                len: 1,
                filter: &raw mut drop_all,
            };
            // SAFETY: setsockopt reads `program` (and the instruction it points to) during the call.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_ATTACH_FILTER,
                    (&raw const program).cast(),
                    size_of::<libc::sock_fprog>() as libc::socklen_t,
                )
            };
            if r == 0 {
                fds.push(owned);
            }
        }
    }
    fds
}

/// Reverse-path filtering drops every packet the TUN delivers (it has no IPv4 address, so even
/// loose mode fails): set the TUN's to 0, and say so loudly if `all` is not 0 as well.
fn prepare_rp_filter(tun: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{tun}/rp_filter");
    if let Err(e) = std::fs::write(&path, "0") {
        tracing::warn!(%path, error = %e, "cannot set rp_filter 0 on the TUN; delivered packets may be dropped");
    }
    match std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter") {
        Ok(v) if v.trim() == "0" => {}
        Ok(v) => tracing::warn!(
            value = v.trim(),
            "net.ipv4.conf.all.rp_filter is not 0: the kernel drops what the agent delivers through the TUN; set it to 0"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read net.ipv4.conf.all.rp_filter"),
    }
}

/// Runs `lb agent` until SIGTERM or SIGINT.
pub fn run(options: &AgentOptions) -> Result<(), String> {
    let config = Config::load(&options.config).map_err(|e| e.to_string())?;
    let policy =
        Policy::from_config(&config).map_err(|e| format!("{}: {e}", options.config.display()))?;
    let agent = config.agent.clone().ok_or("no [agent] section")?;
    let interface = config.node.interface.clone().ok_or_else(|| {
        format!(
            "{}: node.interface: lb agent needs the interface encapsulated packets arrive on",
            options.config.display()
        )
    })?;
    let mut rx = AfPacketReceiver::open(&interface, None, RingConfig::default())
        .map_err(|e| e.to_string())?;
    let tun = Tun::open(&agent.tun, true).map_err(|e| e.to_string())?;
    prepare_rp_filter(tun.name());
    let mut tx = RawIpTransmitter::open(BATCH_FRAMES).map_err(|e| e.to_string())?;
    let mut diag = SockDiag::open().map_err(|e| format!("sock_diag: {e}"))?;
    let _quiet = quiet_tunnel_protocols();
    let shared = Arc::new(Shared {
        name: config.node.name.clone(),
        addresses: policy.addresses().to_vec(),
        muxes: policy.muxes().iter().map(ToString::to_string).collect(),
        tun: agent.tun.clone(),
        counters: Mutex::new(AgentCounters::default()),
        heartbeat: Mutex::new(None),
        shutdown: AtomicBool::new(false),
    });
    let socket_path = options
        .control_socket
        .clone()
        .unwrap_or_else(|| config.node.control_socket_path());
    let socket = ControlSocket::serve(Arc::clone(&shared) as Arc<dyn ControlHandler>, &socket_path)
        .map_err(|e| e.to_string())?;
    if !options.no_metrics {
        let address = options
            .metrics_address
            .unwrap_or(config.node.metrics_address);
        crate::exporter::install(address)?;
        let shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("lb-metrics".into())
            .spawn(move || {
                while !shared.stopping() {
                    export(&shared);
                    thread::sleep(crate::exporter::UPDATE_INTERVAL);
                }
            })
            .map_err(|e| e.to_string())?;
    }
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("signal handlers: {e}"))?;
    {
        let shared = Arc::clone(&shared);
        thread::Builder::new()
            .name("lb-signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    tracing::info!(signal, "shutting down");
                    shared.shutdown.store(true, Ordering::Relaxed);
                }
            })
            .map_err(|e| e.to_string())?;
    }
    tracing::info!(
        node = %config.node.name,
        %interface,
        tun = %agent.tun,
        addresses = ?policy.addresses(),
        muxes = ?shared.muxes,
        "lb agent running"
    );
    let link = rx.link();
    let mut local = AgentCounters::default();
    let mut known_connections: HashMap<(SocketAddr, SocketAddr), Instant> = HashMap::new();
    let mut out = vec![0u8; 65_535 + 48];
    let mut last_report = Instant::now();
    while !shared.stopping() {
        let received = rx.receive(BATCH_FRAMES, POLL_TIMEOUT, &mut |frame| {
            local.frames += 1;
            let Ok(parsed) = packet::parse(frame, link) else {
                return;
            };
            let mut lookups = 0;
            let mut has_connection = |l: SocketAddr, r: SocketAddr| {
                if known_connections.contains_key(&(l, r)) {
                    return true;
                }
                lookups += 1;
                let exists = diag.tcp_connection_exists(l, r).unwrap_or(false);
                if exists && known_connections.len() < 65_536 {
                    known_connections.insert((l, r), Instant::now());
                }
                exists
            };
            let verdict = classify(parsed.ip, &policy, &mut has_connection);
            local.connection_lookups += lookups;
            match verdict {
                Verdict::NotOurs => {}
                Verdict::Reject(r) => local.rejected[r as usize] += 1,
                Verdict::Deliver(inner)
                | Verdict::DeliverUnknownPrevious(inner)
                | Verdict::DeliverChained(inner) => {
                    match verdict {
                        Verdict::DeliverUnknownPrevious(_) => local.delivered_unknown_previous += 1,
                        Verdict::DeliverChained(_) => local.delivered_chained += 1,
                        _ => {}
                    }
                    match tun.write_packet(inner) {
                        Ok(()) => local.delivered += 1,
                        Err(_) => local.tun_errors += 1,
                    }
                }
                Verdict::Chain { inner, to } => {
                    let source = policy
                        .addresses()
                        .iter()
                        .copied()
                        .find(|a| a.is_ipv4() == to.is_ipv4());
                    let sent = source.and_then(|outer_src| {
                        let params = EncapParams {
                            outer_src,
                            outer_dst: to,
                            ttl: config.node.ttl,
                            kind: EncapKind::Gre { key: None },
                        };
                        let n = encapsulate(inner, &params, &mut out).ok()?;
                        tx.queue(out.get(..n)?, to).ok()
                    });
                    if sent.is_some() {
                        local.chained += 1;
                    } else {
                        local.chain_send_failed += 1;
                    }
                }
            }
        });
        if received.is_err() {
            thread::sleep(POLL_TIMEOUT);
        }
        if tx.queued() > 0
            && let Ok(r) = tx.flush()
        {
            local.chain_send_failed += r.failed;
        }
        if last_report.elapsed() >= REPORT_INTERVAL {
            if let Ok(mut c) = shared.counters.try_lock() {
                *c = local;
            }
            if let Ok(mut h) = shared.heartbeat.try_lock() {
                *h = Some(Instant::now());
            }
            // Forget connections not confirmed for a while (they may have closed).
            known_connections.retain(|_, seen| seen.elapsed() < Duration::from_secs(60));
            last_report = Instant::now();
        }
    }
    *shared
        .counters
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = local;
    drop(socket);
    tracing::info!("lb agent stopped");
    Ok(())
}

fn export(shared: &Shared) {
    use metrics::counter;
    let c = *shared
        .counters
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    counter!("lb_agent_frames_total").absolute(c.frames);
    counter!("lb_agent_delivered_total").absolute(c.delivered);
    counter!("lb_agent_delivered_unknown_previous_total").absolute(c.delivered_unknown_previous);
    counter!("lb_agent_chained_total").absolute(c.chained);
    counter!("lb_agent_delivered_chained_total").absolute(c.delivered_chained);
    for (r, n) in Reject::ALL.iter().zip(c.rejected) {
        counter!("lb_agent_rejected_total", "reason" => r.name()).absolute(n);
    }
    counter!("lb_agent_tun_errors_total").absolute(c.tun_errors);
    counter!("lb_agent_chain_send_failed_total").absolute(c.chain_send_failed);
    counter!("lb_agent_connection_lookups_total").absolute(c.connection_lookups);
}
