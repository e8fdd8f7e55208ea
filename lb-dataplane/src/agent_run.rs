//! `lb agent` as a process: the receive loop around [`crate::agent::classify`], the TUN, the
//! chaining transmitter, egress SNAT, the control socket and the metrics.
//!
//! One thread receives (AF_XDP sockets on every queue of `node.interface` steering only tunnel
//! packets to the agent's addresses, or an AF_PACKET ring: `node.io`), decides, hands delivered
//! packets to the [`crate::coalesce::Coalescer`] and queues chained ones; at the end of each
//! batch it writes what the coalescer holds into the TUN (a flow's in-order TCP segments as one
//! GSO write) and flushes the chained ones. Another thread reads what the kernel routes into the
//! TUN (egress connections; with the TUN's offloads on, TCP GSO packets it cuts into segments)
//! and translates it. Counters are published every [`crate::worker::REPORT_INTERVAL`];
//! `delivered` against `tun_writes` shows how much coalescing saves.
//!
//! **Counters.** One set, [`AgentCounters`], feeds both `lb status` (`counters`, a flat object)
//! and the metrics: [`AgentCounters::rows`] names each counter's status key and Prometheus
//! series, and both are written from it, so they cannot disagree (beyond the exporter's refresh
//! interval).
//!
//! **Invariants.** The receive loop's per-packet path allocates nothing and takes no lock: the
//! coalescer's slots are allocated at start, and the SNAT tables are locked at most once per
//! batch, only for a batch holding return traffic of an egress connection (`SnatPorts` tells
//! which packets are). The receive loop never waits for a reader of its counters (`try_lock`); what
//! daisy chaining may cost is bounded by [`crate::chain_guard`] (answer caches, a lookup budget
//! and a relay budget, every refusal counted); SIGHUP or a changed file reloads the VIPs, muxes,
//! peers, chaining budgets and the IPv6 egress exceptions between batches (a bad file is logged,
//! the old config kept); SIGTERM/SIGINT stop it after its batch, exit 0. A start after a crash
//! needs no cleaning up: stale egress rules are replaced ([`crate::egress`]), a stale control
//! socket is replaced ([`crate::socket`]), and the TUN went with the crashed process.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use lb_core::config::Config;
use lb_core::encap::{EncapKind, EncapParams, encapsulate};
use lb_core::packet;
use serde_json::{Value, json};

use crate::afpacket::{AfPacketReceiver, RingConfig};
use crate::agent::{Policy, Reject, Verdict, classify, unparsed};
use crate::chain_guard::{Asking, ChainBudget, ChainGuard};
use crate::coalesce::{Coalescer, MAX_PACKET, PushError};
use crate::device::{Receiver, Transmitter};
use crate::egress::{EGRESS_MARK, EgressRoutes, RefusedFlows, flow_of, is_egress, refusal};
use crate::process::RunOptions;
use crate::rawip::RawIpTransmitter;
use crate::sockdiag::SockDiag;
use crate::socket::{ControlHandler, ControlSocket};
use crate::tun::Tun;
use crate::vnet::{VnetHeader, complete_checksum, split_tcp};
use crate::watch::{Change, ConfigWatch};
use crate::worker::{BATCH_FRAMES, POLL_TIMEOUT, REPORT_INTERVAL, monotonic_ns};
use lb_core::snat::{PortRanges, SnatError, SnatTable, SnatTableConfig};

pub use crate::egress::EGRESS_TABLE;

/// The agent's counters, cumulative.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentCounters {
    /// Frames received on the interface.
    pub frames: u64,
    /// Frames the kernel dropped at the receive ring before the agent saw them (ring full:
    /// `PACKET_STATISTICS`).
    pub kernel_drops: u64,
    /// Inner packets written into the TUN (a coalesced write counts each of its segments).
    pub delivered: u64,
    /// `write` calls into the TUN that succeeded: fewer than `delivered` when TCP segments were
    /// coalesced ([`crate::coalesce`]).
    pub tun_writes: u64,
    /// Of the delivered packets, those written as part of a coalesced super-packet of two or
    /// more segments.
    pub tun_coalesced: u64,
    /// Of those, packets that named a previous backend this host does not know.
    pub delivered_unknown_previous: u64,
    /// Packets sent on to their previous backend (daisy chaining).
    pub chained: u64,
    /// Packets another backend chained here, delivered.
    pub delivered_chained: u64,
    /// Rejected tunnel packets, indexed as [`Reject::ALL`].
    pub rejected: [u64; Reject::ALL.len()],
    /// Packets whose TUN write failed (a failed coalesced write counts each of its segments).
    pub tun_errors: u64,
    /// Chained packets the kernel refused to send.
    pub chain_send_failed: u64,
    /// sock_diag queries made (daisy chaining).
    pub connection_lookups: u64,
    /// Chaining candidates answered from the agent's caches, without a query.
    pub connection_cache_hits: u64,
    /// Egress SNAT: outbound packets translated to a VIP source and sent.
    pub snat_outbound: u64,
    /// Egress SNAT: new port mappings.
    pub snat_new_mappings: u64,
    /// Egress SNAT: outbound packets refused (no port left, not TCP/UDP, malformed, not sent).
    pub snat_outbound_failed: u64,
    /// Egress SNAT: connections refused because no port was free (this host's ranges exhausted
    /// toward the destination, or its table full), each answered with an ICMP error so that it
    /// fails at once. Counted once per connection, not per packet.
    pub snat_exhausted: u64,
    /// Egress SNAT: return packets translated back and delivered.
    pub snat_inbound: u64,
    /// Egress SNAT: return packets to one of this host's ports with no mapping (expired, or
    /// never made): dropped.
    pub snat_inbound_misses: u64,
    /// Packets the kernel routed into the TUN that are not egress traffic (the TUN's own IPv6
    /// router solicitations and multicast-listener reports, multicast, broadcast): ignored.
    pub tun_ignored: u64,
    /// Egress SNAT: reads from the TUN that were TCP GSO packets (the TUN's offloads), each cut
    /// into wire-size segments before translation.
    pub tun_gso_reads: u64,
}

/// Where one counter of [`AgentCounters`] shows: its key in `lb status` (`counters`) and its
/// Prometheus series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterSpec {
    /// The key in the status answer's `counters` object.
    pub key: &'static str,
    /// The metric's name.
    pub metric: &'static str,
    /// Its one label, if any: (name, value).
    pub label: Option<(&'static str, &'static str)>,
}

impl AgentCounters {
    /// Every counter with where it shows, in status order. The one list both `lb status` and
    /// the metrics are written from.
    #[must_use]
    pub fn rows(&self) -> Vec<(CounterSpec, u64)> {
        let plain = |key, metric, value| {
            (
                CounterSpec {
                    key,
                    metric,
                    label: None,
                },
                value,
            )
        };
        let labelled = |key, metric, label, value| {
            (
                CounterSpec {
                    key,
                    metric,
                    label: Some(label),
                },
                value,
            )
        };
        let mut rows = vec![
            plain("frames", "lb_agent_frames_total", self.frames),
            plain(
                "kernel_drops",
                "lb_agent_kernel_drops_total",
                self.kernel_drops,
            ),
            plain("delivered", "lb_agent_delivered_total", self.delivered),
            plain("tun_writes", "lb_agent_tun_writes_total", self.tun_writes),
            plain(
                "tun_coalesced",
                "lb_agent_tun_coalesced_total",
                self.tun_coalesced,
            ),
            plain(
                "delivered_unknown_previous",
                "lb_agent_delivered_unknown_previous_total",
                self.delivered_unknown_previous,
            ),
            plain("chained", "lb_agent_chained_total", self.chained),
            plain(
                "delivered_chained",
                "lb_agent_delivered_chained_total",
                self.delivered_chained,
            ),
        ];
        for r in Reject::ALL {
            rows.push(labelled(
                r.status_key(),
                "lb_agent_rejected_total",
                ("reason", r.name()),
                self.rejected[r.index()],
            ));
        }
        rows.extend([
            plain("tun_errors", "lb_agent_tun_errors_total", self.tun_errors),
            plain(
                "chain_send_failed",
                "lb_agent_chain_send_failed_total",
                self.chain_send_failed,
            ),
            plain(
                "connection_lookups",
                "lb_agent_connection_lookups_total",
                self.connection_lookups,
            ),
            plain(
                "connection_cache_hits",
                "lb_agent_connection_cache_hits_total",
                self.connection_cache_hits,
            ),
            labelled(
                "snat_outbound",
                "lb_agent_snat_translations_total",
                ("direction", "outbound"),
                self.snat_outbound,
            ),
            labelled(
                "snat_inbound",
                "lb_agent_snat_translations_total",
                ("direction", "inbound"),
                self.snat_inbound,
            ),
            plain(
                "snat_new_mappings",
                "lb_agent_snat_new_mappings_total",
                self.snat_new_mappings,
            ),
            plain(
                "snat_outbound_failed",
                "lb_agent_snat_outbound_failed_total",
                self.snat_outbound_failed,
            ),
            plain(
                "snat_exhausted",
                "lb_agent_snat_exhausted_total",
                self.snat_exhausted,
            ),
            plain(
                "snat_inbound_misses",
                "lb_agent_snat_inbound_misses_total",
                self.snat_inbound_misses,
            ),
            plain(
                "tun_ignored",
                "lb_agent_tun_ignored_total",
                self.tun_ignored,
            ),
            plain(
                "tun_gso_reads",
                "lb_agent_tun_gso_reads_total",
                self.tun_gso_reads,
            ),
        ]);
        rows
    }

    /// The status answer's `counters` object: every counter by its key, a flat object of numbers.
    #[must_use]
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.rows()
                .into_iter()
                .map(|(spec, n)| (spec.key.to_owned(), json!(n)))
                .collect(),
        )
    }
}

/// The counters the TUN reader (egress SNAT, outbound) keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct OutboundCounters {
    snat_outbound: u64,
    snat_new_mappings: u64,
    snat_outbound_failed: u64,
    snat_exhausted: u64,
    tun_ignored: u64,
    tun_gso_reads: u64,
}

struct Shared {
    name: String,
    addresses: Vec<IpAddr>,
    muxes: Vec<String>,
    tun: String,
    /// The receive loop's counters (its outbound SNAT ones stay 0).
    counters: Mutex<AgentCounters>,
    heartbeat: Mutex<Option<Instant>>,
    shutdown: AtomicBool,
    /// Egress SNAT tables, one per SNAT address this host takes part in: the mappings both
    /// directions share and change (the TUN reader makes them, return traffic refreshes them).
    /// The receive loop locks them at most once per batch, and only for a batch that holds
    /// return traffic (it tells return traffic by its own copy of the port sets,
    /// [`SnatPorts`]); the TUN reader once per packet it reads (one GSO packet: all of its
    /// segments).
    snat: Mutex<Vec<SnatTable>>,
    /// Outbound SNAT counters, kept by the TUN reader.
    outbound: Mutex<OutboundCounters>,
}

impl ControlHandler for Shared {
    fn handle_line(&self, line: &str) -> Value {
        match crate::socket::status_request(line, "agent") {
            Ok(()) => self.status(),
            Err(answer) => answer,
        }
    }

    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }
}

impl Shared {
    /// Every counter: the receive loop's with the TUN reader's. What status and metrics show.
    fn counters(&self) -> AgentCounters {
        let mut c = *self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let o = *self.outbound.lock().unwrap_or_else(PoisonError::into_inner);
        c.snat_outbound = o.snat_outbound;
        c.snat_new_mappings = o.snat_new_mappings;
        c.snat_outbound_failed = o.snat_outbound_failed;
        c.snat_exhausted = o.snat_exhausted;
        c.tun_ignored = o.tun_ignored;
        c.tun_gso_reads = o.tun_gso_reads;
        c
    }

    /// How long ago the receive loop last went round.
    fn last_seen(&self) -> Option<Duration> {
        self.heartbeat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|h| h.elapsed())
    }

    /// Healthy: the receive loop went round within the last second.
    fn healthy(&self) -> bool {
        self.last_seen().is_some_and(|d| d < Duration::from_secs(1))
    }

    fn status(&self) -> Value {
        let c = self.counters();
        let last_seen = self.last_seen();
        let healthy = self.healthy();
        json!({
            "ok": true,
            "role": "agent",
            "node": self.name,
            "addresses": self.addresses,
            "muxes": self.muxes,
            "tun": self.tun,
            "healthy": healthy,
            "last_seen_ms": last_seen.map(|d| d.as_millis() as u64),
            "counters": c.to_json(),
            "snat": self.snat.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|t| {
                let k = t.counters();
                json!({
                    "address": t.snat_address(),
                    "ranges": t.ranges().map(|r| format!("{}-{}", r.start(), r.end())).collect::<Vec<_>>(),
                    "active_mappings": k.active_mappings,
                    "ports_in_use": k.ports_in_use,
                })
            }).collect::<Vec<_>>(),
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

/// A raw-IP transmitter whose packets carry [`EGRESS_MARK`], so egress steering leaves them
/// alone (a failure to mark is logged: IPv6 egress to a peer or a translated packet would then
/// be steered back into the TUN).
fn marked_transmitter() -> Result<RawIpTransmitter, String> {
    let mut tx = RawIpTransmitter::open(BATCH_FRAMES).map_err(|e| e.to_string())?;
    if let Err(e) = tx.set_mark(EGRESS_MARK) {
        tracing::warn!(error = %e, "cannot mark the agent's packets; IPv6 egress steering may catch them");
    }
    Ok(tx)
}

/// Every VIP and SNAT address of `config`: the sources of the servers' direct-server-return
/// replies, which egress steering must leave alone.
fn vip_addresses(config: &Config) -> Vec<IpAddr> {
    config
        .vips
        .iter()
        .map(|v| v.address)
        .chain(config.snats.iter().map(|s| s.address))
        .collect()
}

/// The policy-routing rules egress SNAT needs for `config`, with the SNAT families at start.
fn egress_rules(
    egress: &[ipnet::IpNet],
    config: &Config,
    policy: &Policy,
    families: (bool, bool),
) -> Vec<crate::egress::Rule> {
    crate::egress::rules(egress, policy.addresses(), &vip_addresses(config), families)
}

/// The agent's receiving device as `io` asks: AF_XDP on every queue of `interface`, steering
/// only tunnel packets to the agent's `addresses` (with the steering to keep while it runs),
/// or an AF_PACKET ring; `auto` tries AF_XDP first and logs why it fell back.
fn open_receiver(
    interface: &str,
    addresses: &[IpAddr],
    io: lb_core::config::IoMode,
) -> Result<(Box<dyn Receiver>, Option<crate::xdp::Steering>), String> {
    use lb_core::config::IoMode;
    if io != IoMode::AfPacket {
        match crate::xdp::open_tunnel_receiver(interface, addresses) {
            Ok((rx, steering, mode)) => {
                tracing::info!(%interface, attach = mode.attach.as_str(), bind = mode.bind.as_str(), queues = mode.queues, "receiving tunnel packets with AF_XDP");
                for why in &mode.fallbacks {
                    tracing::warn!(%interface, reason = %why, "AF_XDP fallback");
                }
                return Ok((Box::new(rx), Some(steering)));
            }
            Err(e) if io == IoMode::Auto => {
                tracing::warn!(%interface, error = %e, "AF_XDP is not available; using AF_PACKET");
            }
            Err(e) => return Err(format!("node.io = \"af_xdp\": {e}")),
        }
    }
    let rx = AfPacketReceiver::open(interface, None, RingConfig::default())
        .map_err(|e| e.to_string())?;
    Ok((Box::new(rx), None))
}

/// Runs `lb agent` until SIGTERM or SIGINT.
pub fn run(options: &RunOptions) -> Result<(), String> {
    let config = Config::load(&options.config).map_err(|e| e.to_string())?;
    config
        .check_role(lb_core::config::Role::Agent, &options.config)
        .map_err(|e| e.to_string())?;
    // check_role refused a config without either.
    let (Some(agent), Some(interface)) = (config.agent.clone(), config.node.interface.clone())
    else {
        return Err("the config has no [agent] section or no node.interface".into());
    };
    let mut policy =
        Policy::from_config(&config).map_err(|e| format!("{}: {e}", options.config.display()))?;
    let (mut rx, _steering) = open_receiver(&interface, policy.addresses(), config.node.io)?;
    let tun = Tun::open(&agent.tun, true).map_err(|e| e.to_string())?;
    if let Err(e) = tun.enable_offloads() {
        tracing::warn!(error = %e, "TUN offloads off: egress packets come one at a time, with complete checksums");
    }
    prepare_rp_filter(tun.name());
    let mut tx = marked_transmitter()?;
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
        snat: Mutex::new(snat_tables(&config, &policy)),
        outbound: Mutex::new(OutboundCounters::default()),
    });
    let tun = Arc::new(tun);
    let families = {
        let tables = shared.snat.lock().unwrap_or_else(PoisonError::into_inner);
        (
            tables.iter().any(|t| t.snat_address().is_ipv4()),
            tables.iter().any(|t| t.snat_address().is_ipv6()),
        )
    };
    for (v6, has) in [(false, families.0), (true, families.1)] {
        if !has && agent.egress.iter().any(|p| p.addr().is_ipv6() == v6) {
            return Err(format!(
                "agent.egress lists IPv{} prefixes, but this host is a backend of no IPv{} [[snat]] address",
                if v6 { 6 } else { 4 },
                if v6 { 6 } else { 4 },
            ));
        }
    }
    let rules = egress_rules(&agent.egress, &config, &policy, families);
    let routes = crate::egress::routes(&rules, policy.addresses(), tun.name());
    let mut egress = EgressRoutes::install(rules, &routes)?;
    let tun_reader = {
        let shared = Arc::clone(&shared);
        let tun = Arc::clone(&tun);
        thread::Builder::new()
            .name("lb-snat-out".into())
            .spawn(move || snat_outbound_loop(&shared, &tun))
            .map_err(|e| e.to_string())?
    };
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
    if let Some(address) = agent.health_address {
        let (live, stop) = (Arc::clone(&shared), Arc::clone(&shared));
        crate::health_endpoint::serve(address, move || live.healthy(), move || stop.stopping())
            .map_err(|e| e.to_string())?;
    }
    let reload_requested = Arc::new(AtomicBool::new(false));
    {
        let shared = Arc::clone(&shared);
        crate::process::handle_signals(Arc::clone(&reload_requested), move || {
            shared.shutdown.store(true, Ordering::Relaxed);
        })?;
    }
    let mut watch = ConfigWatch::new(
        &options.config,
        crate::control::file_digest(&options.config),
    );
    let mut last_watch = Instant::now();
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
    let mut guard = ChainGuard::new(ChainBudget::of(&agent), monotonic_ns());
    let mut out = vec![0u8; 65_535 + 48];
    let mut scratch = vec![0u8; 65_535];
    let mut coalescer = Coalescer::new(BATCH_FRAMES);
    let mut snat_ports = SnatPorts::of(&shared.snat.lock().unwrap_or_else(PoisonError::into_inner));
    let mut last_report = Instant::now();
    let mut last_expire = Instant::now();
    while !shared.stopping() {
        // Taken at the first return packet of a batch, released at its end.
        let mut snat_hold: Option<MutexGuard<'_, Vec<SnatTable>>> = None;
        let received = rx.receive(BATCH_FRAMES, POLL_TIMEOUT, &mut |frame| {
            local.frames += 1;
            let parsed = match packet::parse(frame, link) {
                Ok(parsed) => parsed,
                Err(e) => {
                    if let Some(r) = unparsed(frame, link, e, &policy) {
                        local.rejected[r.index()] += 1;
                    }
                    return;
                }
            };
            let now = monotonic_ns();
            let mut lookup =
                |l: SocketAddr, r: SocketAddr| diag.tcp_connection_exists(l, r).unwrap_or(false);
            let mut asking = Asking {
                guard: &mut guard,
                now,
                lookup: &mut lookup,
            };
            let verdict = classify(parsed.ip, &policy, &mut asking);
            match verdict {
                Verdict::NotOurs => {}
                Verdict::Reject(r) => local.rejected[r.index()] += 1,
                Verdict::Deliver(inner)
                | Verdict::DeliverUnknownPrevious(inner)
                | Verdict::DeliverChained(inner) => {
                    match verdict {
                        Verdict::DeliverUnknownPrevious(_) => local.delivered_unknown_previous += 1,
                        Verdict::DeliverChained(_) => local.delivered_chained += 1,
                        _ => {}
                    }
                    let packet = match snat_inbound(
                        &shared,
                        &snat_ports,
                        &mut snat_hold,
                        inner,
                        &mut scratch,
                    ) {
                        SnatInbound::NotSnat => inner,
                        SnatInbound::Translated(len) => {
                            local.snat_inbound += 1;
                            &scratch[..len]
                        }
                        SnatInbound::NoMapping => {
                            local.snat_inbound_misses += 1;
                            return;
                        }
                    };
                    deliver(&mut coalescer, &tun, &mut local, packet);
                }
                Verdict::Chain { inner, to } => {
                    if !guard.allow_relay(now) {
                        local.rejected[Reject::RelayBudget.index()] += 1;
                        return;
                    }
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
        drop(snat_hold);
        flush_tun(&mut coalescer, &tun, &mut local);
        if received.is_err() {
            thread::sleep(POLL_TIMEOUT);
        }
        if tx.queued() > 0
            && let Ok(r) = tx.flush()
        {
            local.chain_send_failed += r.failed;
        }
        if last_report.elapsed() >= REPORT_INTERVAL {
            let chain = guard.counters();
            local.connection_lookups = chain.lookups;
            local.connection_cache_hits = chain.cache_hits;
            local.kernel_drops = rx.kernel_drops();
            if let Ok(mut c) = shared.counters.try_lock() {
                *c = local;
            }
            if let Ok(mut h) = shared.heartbeat.try_lock() {
                *h = Some(Instant::now());
            }
            last_report = Instant::now();
        }
        if last_expire.elapsed() >= Duration::from_secs(1) {
            guard.expire(monotonic_ns());
            last_expire = Instant::now();
        }
        // Reload on SIGHUP or a changed file: the VIPs, muxes and peers (new backends may chain
        // here), the chaining budgets, the IPv6 egress exceptions (the VIPs), and the SNAT split
        // if it changed. A bad file is logged and the old one kept.
        // The file watcher offers new contents only once the file is complete (never a
        // half-written one); SIGHUP reads the file at once.
        let read = if reload_requested.swap(false, Ordering::Relaxed) {
            Some(Config::load(&options.config))
        } else if last_watch.elapsed() >= crate::watch::TICK {
            last_watch = Instant::now();
            match watch.poll() {
                Some(Change::Ready(bytes, _)) => Some(Config::from_bytes(bytes, &options.config)),
                Some(Change::Unreadable(reason)) => {
                    tracing::warn!(file = %options.config.display(), %reason, "config file unreadable; the config in force keeps serving");
                    None
                }
                None => None,
            }
        } else {
            None
        };
        if let Some(read) = read {
            match read
                .map_err(|e| e.to_string())
                .and_then(|c| Policy::from_config(&c).map(|p| (c, p)))
            {
                Ok((new_config, new_policy)) => {
                    let new_tables = snat_tables(&new_config, &new_policy);
                    let mut tables = shared.snat.lock().unwrap_or_else(PoisonError::into_inner);
                    let same_split = tables.len() == new_tables.len()
                        && tables.iter().zip(&new_tables).all(|(a, b)| {
                            a.snat_address() == b.snat_address() && a.ranges().eq(b.ranges())
                        });
                    if !same_split {
                        tracing::warn!("the SNAT port split changed: egress mappings start afresh");
                        *tables = new_tables;
                        snat_ports = SnatPorts::of(&tables);
                    }
                    drop(tables);
                    if let Some(a) = &new_config.agent {
                        guard.set_budget(ChainBudget::of(a), monotonic_ns());
                    }
                    // The egress prefixes themselves need a restart; the VIPs they exempt follow.
                    let rules = egress_rules(&agent.egress, &new_config, &new_policy, families);
                    if let Err(e) = egress.update(rules) {
                        tracing::error!(error = %e, "egress steering rules not updated");
                    }
                    policy = new_policy;
                    tracing::info!("config reloaded");
                }
                Err(e) => tracing::error!(error = %e, "config rejected; the previous one stays"),
            }
        }
    }
    let chain = guard.counters();
    local.connection_lookups = chain.lookups;
    local.connection_cache_hits = chain.cache_hits;
    local.kernel_drops = rx.kernel_drops();
    *shared
        .counters
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = local;
    let _ = tun_reader.join();
    drop(egress);
    drop(socket);
    tracing::info!("lb agent stopped");
    Ok(())
}

/// The SNAT tables of the SNAT addresses this host is a backend of, with its port ranges.
fn snat_tables(config: &Config, policy: &Policy) -> Vec<SnatTable> {
    config
        .snats
        .iter()
        .filter_map(|c| {
            let backends = config.snat_backends(c.address);
            let me = policy
                .addresses()
                .iter()
                .copied()
                .find(|a| backends.contains(a))?;
            let ranges = PortRanges::build(c, &backends).ranges_of(me);
            tracing::info!(address = %c.address, ranges = ranges.len(), "egress SNAT port ranges");
            Some(SnatTable::new(
                c.address,
                ranges,
                SnatTableConfig::from_config(c, SNAT_CAPACITY),
            ))
        })
        .collect()
}

/// Mappings per SNAT address.
const SNAT_CAPACITY: usize = 65_536;

/// What [`snat_inbound`] did with a delivered packet.
enum SnatInbound {
    /// Not return traffic of an egress connection: deliver as it is.
    NotSnat,
    /// Translated into the scratch buffer (this many bytes): deliver that.
    Translated(usize),
    /// To one of this host's SNAT ports, but no mapping: drop.
    NoMapping,
}

/// The receive loop's copy of which ports of which SNAT address are this host's: the port sets
/// of [`Shared::snat`]'s tables, in the same order. With it, a delivered packet that is not
/// return traffic of an egress connection (nearly all of them) is told without the tables'
/// lock. Only the receive loop replaces the tables (on a reload, between batches), and it
/// rebuilds this copy at the same time, so the two never disagree; no atomics are needed.
struct SnatPorts {
    /// (SNAT address, bit `p` set when port `p` is this host's), one per table.
    tables: Vec<(IpAddr, Box<[u64]>)>,
}

impl SnatPorts {
    /// The port sets of `tables`.
    fn of(tables: &[SnatTable]) -> SnatPorts {
        SnatPorts {
            tables: tables
                .iter()
                .map(|t| {
                    let mut bits = vec![0u64; 65_536 / 64].into_boxed_slice();
                    for p in t.ranges().flatten() {
                        bits[usize::from(p) / 64] |= 1 << (p % 64);
                    }
                    (t.snat_address(), bits)
                })
                .collect(),
        }
    }

    /// The index of the table that owns (`address`, `port`), if any.
    fn table_of(&self, address: IpAddr, port: u16) -> Option<usize> {
        self.tables.iter().position(|(a, bits)| {
            *a == address && bits[usize::from(port) / 64] >> (port % 64) & 1 == 1
        })
    }
}

/// Translates return traffic of an egress connection into `scratch`. `tables` is the batch's
/// hold on the SNAT tables, taken here at the batch's first return packet.
fn snat_inbound<'a>(
    shared: &'a Shared,
    ports: &SnatPorts,
    tables: &mut Option<MutexGuard<'a, Vec<SnatTable>>>,
    inner: &[u8],
    scratch: &mut [u8],
) -> SnatInbound {
    if ports.tables.is_empty() {
        return SnatInbound::NotSnat;
    }
    let Some((dst, port)) = transport_destination(inner) else {
        return SnatInbound::NotSnat;
    };
    let Some(index) = ports.table_of(dst, port) else {
        return SnatInbound::NotSnat;
    };
    let tables =
        tables.get_or_insert_with(|| shared.snat.lock().unwrap_or_else(PoisonError::into_inner));
    let Some(table) = tables.get_mut(index) else {
        return SnatInbound::NotSnat;
    };
    let Some(buf) = scratch.get_mut(..inner.len()) else {
        return SnatInbound::NoMapping;
    };
    buf.copy_from_slice(inner);
    match table.translate_inbound(buf, monotonic_ns()) {
        Ok(_) => SnatInbound::Translated(inner.len()),
        Err(_) => SnatInbound::NoMapping,
    }
}

/// Hands a packet to deliver to the coalescer (written at the batch's end by [`flush_tun`]).
fn deliver(coalescer: &mut Coalescer, tun: &Tun, local: &mut AgentCounters, packet: &[u8]) {
    match coalescer.push(packet) {
        Ok(()) => {}
        Err(PushError::Full) => {
            // More packets than slots (never within one batch of BATCH_FRAMES): write what is
            // pending, in order, and start afresh.
            flush_tun(coalescer, tun, local);
            if coalescer.push(packet).is_err() {
                local.tun_errors += 1;
            }
        }
        Err(PushError::BadLength) => local.tun_errors += 1,
    }
}

/// Writes everything the coalescer holds into the TUN, one `write` per item, and counts it.
fn flush_tun(coalescer: &mut Coalescer, tun: &Tun, local: &mut AgentCounters) {
    if coalescer.pending() == 0 {
        return;
    }
    let c = coalescer.flush(&mut |frame| tun.write_frame(frame));
    local.delivered += c.packets;
    local.tun_writes += c.writes;
    local.tun_coalesced += c.coalesced;
    local.tun_errors += c.failed_packets;
}

/// The destination address and TCP/UDP port of an unfragmented IP packet.
fn transport_destination(packet: &[u8]) -> Option<(IpAddr, u16)> {
    let parsed = packet::parse(packet, packet::Link::Ip).ok()?;
    match parsed.kind {
        packet::Kind::Transport { flow, .. } => Some((flow.dst(), flow.dst_port())),
        _ => None,
    }
}

/// Reads what the kernel routes into the TUN (egress connections of this host), translates the
/// source to a VIP and a port of this host's ranges, and sends it. A connection that gets no
/// port is refused at once with an ICMP error written back into the TUN.
///
/// With the TUN's offloads on ([`Tun::enable_offloads`]) one read may be a TCP GSO packet of
/// up to 64 KiB: it is cut into wire-size segments with full checksums
/// ([`crate::vnet::split_tcp`]) and each is translated; a packet with a partial checksum gets
/// it completed ([`crate::vnet::complete_checksum`]). The SNAT tables are locked once per read
/// and the translated packets sent with one flush per read.
fn snat_outbound_loop(shared: &Shared, tun: &Tun) {
    let mut tx = match marked_transmitter() {
        Ok(tx) => tx,
        Err(e) => {
            tracing::error!(error = %e, "egress SNAT: cannot open raw sockets; egress connections will fail");
            return;
        }
    };
    let mut counters = OutboundCounters::default();
    let mut refused = RefusedFlows::default();
    let mut buf = vec![0u8; MAX_PACKET];
    let mut segment = vec![0u8; MAX_PACKET];
    let mut icmp = vec![0u8; 1280];
    let mut last_expire = Instant::now();
    while !shared.stopping() {
        let (header, len) = match tun.read_packet(&mut buf, POLL_TIMEOUT) {
            Ok(Some(read)) => read,
            Ok(None) => (VnetHeader::NONE, 0),
            Err(e) => {
                tracing::warn!(error = %e, "TUN read failed");
                thread::sleep(POLL_TIMEOUT);
                (VnetHeader::NONE, 0)
            }
        };
        if len > 0
            && let Some(packet) = buf.get_mut(..len)
        {
            if is_egress(packet) {
                let mut tables = shared.snat.lock().unwrap_or_else(PoisonError::into_inner);
                let mut egress = Egress {
                    tables: &mut tables,
                    tun,
                    tx: &mut tx,
                    counters: &mut counters,
                    refused: &mut refused,
                    icmp: &mut icmp,
                };
                if header.is_gso() {
                    egress.counters.tun_gso_reads += 1;
                    let split = split_tcp(header, packet, &mut segment, &mut |seg| {
                        egress.packet(seg);
                    });
                    if split.is_err() {
                        counters.snat_outbound_failed += 1;
                    }
                } else if complete_checksum(header, packet).is_ok() {
                    egress.packet(packet);
                } else {
                    counters.snat_outbound_failed += 1;
                }
                drop(tables);
                if tx.queued() > 0 {
                    let report = tx.flush().unwrap_or_default();
                    counters.snat_outbound += report.sent;
                    counters.snat_outbound_failed += report.failed;
                }
            } else {
                counters.tun_ignored += 1;
            }
        }
        if last_expire.elapsed() >= REPORT_INTERVAL {
            let now = monotonic_ns();
            for t in shared
                .snat
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter_mut()
            {
                t.expire(now, 1024);
            }
            *shared
                .outbound
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = counters;
            last_expire = Instant::now();
        }
    }
    *shared
        .outbound
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = counters;
}

/// What the TUN reader translates one egress packet with.
struct Egress<'a> {
    tables: &'a mut Vec<SnatTable>,
    tun: &'a Tun,
    tx: &'a mut RawIpTransmitter,
    counters: &'a mut OutboundCounters,
    refused: &'a mut RefusedFlows,
    icmp: &'a mut [u8],
}

impl Egress<'_> {
    /// One egress packet (whole, checksums complete): translated and queued (counted when
    /// the queue is flushed), or refused.
    fn packet(&mut self, packet: &mut [u8]) {
        let now = monotonic_ns();
        let version_v4 = packet.first().is_some_and(|b| b >> 4 == 4);
        let result = self
            .tables
            .iter_mut()
            .find(|t| t.snat_address().is_ipv4() == version_v4)
            .map(|t| t.translate_outbound(packet, now));
        let counters = &mut *self.counters;
        match result {
            Some(Ok(t)) => {
                if t.new_mapping {
                    counters.snat_new_mappings += 1;
                }
                if self.tx.queue(packet, t.remote.ip()).is_err() {
                    counters.snat_outbound_failed += 1;
                }
            }
            Some(Err(SnatError::Exhausted | SnatError::TableFull)) => {
                // The packet is unchanged: refuse it where it came from, so that the connection
                // fails now instead of retrying a SYN that goes nowhere.
                counters.snat_outbound_failed += 1;
                if self.refused.first(flow_of(packet), now) {
                    counters.snat_exhausted += 1;
                    if counters.snat_exhausted.is_power_of_two() {
                        tracing::warn!(
                            connections = counters.snat_exhausted,
                            "egress SNAT: no port free (this host's port ranges exhausted toward the destination, or its table full); new connections are refused"
                        );
                    }
                }
                if let Some(n) = refusal(packet, self.icmp) {
                    let _ = self.tun.write_packet(&self.icmp[..n]);
                }
            }
            // Not TCP/UDP (a ping), a fragment, no SNAT address of this family: not translated.
            Some(Err(_)) | None => counters.snat_outbound_failed += 1,
        }
    }
}

/// Copies the counters into the metrics registry: the same rows `lb status` shows, and the SNAT
/// port gauges.
fn export(shared: &Shared) {
    for (spec, value) in shared.counters().rows() {
        match spec.label {
            None => metrics::counter!(spec.metric).absolute(value),
            Some((name, label)) => metrics::counter!(spec.metric, name => label).absolute(value),
        }
    }
    for t in shared
        .snat
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
    {
        let k = t.counters();
        let address = t.snat_address().to_string();
        metrics::gauge!("lb_agent_snat_ports_in_use", "address" => address.clone())
            .set(k.ports_in_use as f64);
        let ports: u64 = t
            .ranges()
            .map(|r| u64::from(*r.end() - *r.start()) + 1)
            .sum();
        metrics::gauge!("lb_agent_snat_ports", "address" => address).set(ports as f64);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_counter_has_one_key_and_one_series() {
        let rows = AgentCounters::default().rows();
        let keys: HashSet<&str> = rows.iter().map(|(s, _)| s.key).collect();
        let series: HashSet<(&str, Option<(&str, &str)>)> =
            rows.iter().map(|(s, _)| (s.metric, s.label)).collect();
        assert_eq!(keys.len(), rows.len());
        assert_eq!(series.len(), rows.len());
        assert!(rows.iter().all(|(s, _)| s.metric.starts_with("lb_agent_")));
        assert!(rows.iter().all(|(s, _)| s.metric.ends_with("_total")));
        // Every field shows: a counter set to 1 at a time moves exactly its row.
        let mut c = AgentCounters {
            frames: 1,
            kernel_drops: 2,
            delivered: 3,
            tun_writes: 24,
            tun_coalesced: 25,
            delivered_unknown_previous: 4,
            chained: 5,
            delivered_chained: 6,
            rejected: [7, 8, 9, 10, 11, 12],
            tun_errors: 13,
            chain_send_failed: 14,
            connection_lookups: 15,
            connection_cache_hits: 16,
            snat_outbound: 17,
            snat_new_mappings: 18,
            snat_outbound_failed: 19,
            snat_exhausted: 20,
            snat_inbound: 21,
            snat_inbound_misses: 22,
            tun_ignored: 23,
            tun_gso_reads: 26,
        };
        let values: HashSet<u64> = c.rows().iter().map(|(_, v)| *v).collect();
        assert_eq!(values, (1..=26).collect());
        let json = c.to_json();
        assert_eq!(json["rejected_foreign_source"], 9);
        assert_eq!(json["snat_exhausted"], 20);
        assert_eq!(json["tun_writes"], 24);
        assert_eq!(json["tun_coalesced"], 25);
        assert!(json.as_object().unwrap().values().all(Value::is_u64));
        c.frames = 0;
        assert_eq!(c.to_json()["frames"], 0);
    }
}
