//! `lb agent` as a process: the receive loop around [`crate::agent::classify`], the TUN, the
//! chaining transmitter, the control socket and the metrics.
//!
//! One thread receives (an AF_PACKET ring on `node.interface`), decides, writes delivered
//! packets into the TUN and queues chained ones, flushing them once per batch. Counters are
//! published every [`crate::worker::REPORT_INTERVAL`] for `lb status` and metrics.
//!
//! **Invariants.** The receive loop never waits for a reader of its counters (`try_lock`);
//! sock_diag answers are cached (present for a minute, absent for 200 ms), so a connection costs
//! a netlink round trip now and then, not one per packet; SIGHUP or a changed file reloads the
//! VIPs, muxes and peers between batches (a bad file is logged, the old config kept);
//! SIGTERM/SIGINT stop it after its batch, exit 0.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use lb_core::config::Config;
use lb_core::encap::{EncapKind, EncapParams, encapsulate};
use lb_core::packet;
use serde_json::{Value, json};

use crate::afpacket::{AfPacketReceiver, RingConfig};
use crate::agent::{Policy, Reject, Verdict, classify};
use crate::device::{Receiver, Transmitter};
use crate::process::RunOptions;
use crate::rawip::RawIpTransmitter;
use crate::sockdiag::SockDiag;
use crate::socket::{ControlHandler, ControlSocket};
use crate::tun::Tun;
use crate::worker::{BATCH_FRAMES, POLL_TIMEOUT, REPORT_INTERVAL};
use lb_core::snat::{PortRanges, SnatError, SnatTable, SnatTableConfig};

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
    /// Egress SNAT: outbound packets translated to a VIP source and sent.
    pub snat_outbound: u64,
    /// Egress SNAT: new port mappings.
    pub snat_new_mappings: u64,
    /// Egress SNAT: outbound packets refused (no port left, not TCP/UDP, malformed).
    pub snat_outbound_failed: u64,
    /// Of those, refused because this host's port ranges were exhausted.
    pub snat_exhausted: u64,
    /// Egress SNAT: return packets translated back and delivered.
    pub snat_inbound: u64,
    /// Egress SNAT: return packets to one of this host's ports with no mapping (expired, or
    /// never made): dropped.
    pub snat_inbound_misses: u64,
}

struct Shared {
    name: String,
    addresses: Vec<IpAddr>,
    muxes: Vec<String>,
    tun: String,
    counters: Mutex<AgentCounters>,
    heartbeat: Mutex<Option<Instant>>,
    shutdown: AtomicBool,
    /// Egress SNAT tables, one per SNAT address this host takes part in. Locked by the receive
    /// loop (return traffic) and the TUN reader (outbound), per packet: the agent's one lock,
    /// uncontended unless both directions are busy at once.
    snat: Mutex<Vec<SnatTable>>,
    /// Outbound SNAT counters, kept by the TUN reader.
    snat_outbound: Mutex<AgentCounters>,
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
    /// The receive loop's counters with the TUN reader's outbound SNAT ones.
    fn counters(&self) -> AgentCounters {
        let mut c = *self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let o = *self
            .snat_outbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        c.snat_outbound = o.snat_outbound;
        c.snat_new_mappings = o.snat_new_mappings;
        c.snat_outbound_failed = o.snat_outbound_failed;
        c.snat_exhausted = o.snat_exhausted;
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
                "snat_outbound": c.snat_outbound,
                "snat_new_mappings": c.snat_new_mappings,
                "snat_outbound_failed": c.snat_outbound_failed,
                "snat_exhausted": c.snat_exhausted,
                "snat_inbound": c.snat_inbound,
                "snat_inbound_misses": c.snat_inbound_misses,
            },
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

/// Runs `lb agent` until SIGTERM or SIGINT.
pub fn run(options: &RunOptions) -> Result<(), String> {
    let config = Config::load(&options.config).map_err(|e| e.to_string())?;
    let mut policy =
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
        snat: Mutex::new(snat_tables(&config, &policy)),
        snat_outbound: Mutex::new(AgentCounters::default()),
    });
    let tun = Arc::new(tun);
    let egress = EgressRoutes::install(&config, &shared, tun.name())?;
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
    let mut config_digest = crate::control::file_digest(&options.config);
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
    // sock_diag answers per (local, remote): present ones for a minute, absent ones for
    // NEGATIVE_TTL, so a chained connection costs a netlink round trip now and then, not per
    // packet.
    let mut known_connections: HashMap<(SocketAddr, SocketAddr), (bool, Instant)> = HashMap::new();
    let mut out = vec![0u8; 65_535 + 48];
    let mut scratch = vec![0u8; 65_535];
    let mut last_report = Instant::now();
    while !shared.stopping() {
        let received = rx.receive(BATCH_FRAMES, POLL_TIMEOUT, &mut |frame| {
            local.frames += 1;
            let Ok(parsed) = packet::parse(frame, link) else {
                return;
            };
            let mut lookups = 0;
            let mut has_connection = |l: SocketAddr, r: SocketAddr| {
                if let Some(&(exists, seen)) = known_connections.get(&(l, r))
                    && (exists || seen.elapsed() < NEGATIVE_TTL)
                {
                    return exists;
                }
                lookups += 1;
                let exists = diag.tcp_connection_exists(l, r).unwrap_or(false);
                if known_connections.len() < KNOWN_CONNECTIONS {
                    known_connections.insert((l, r), (exists, Instant::now()));
                }
                exists
            };
            let verdict = classify(parsed.ip, &policy, &mut has_connection);
            local.connection_lookups += lookups;
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
                    let written = match snat_inbound(&shared, inner, &mut scratch) {
                        SnatInbound::NotSnat => tun.write_packet(inner),
                        SnatInbound::Translated(len) => {
                            local.snat_inbound += 1;
                            tun.write_packet(&scratch[..len])
                        }
                        SnatInbound::NoMapping => {
                            local.snat_inbound_misses += 1;
                            return;
                        }
                    };
                    match written {
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
            // Forget answers that may be stale (connections close, chained ones settle).
            known_connections.retain(|_, (exists, seen)| {
                seen.elapsed()
                    < if *exists {
                        Duration::from_secs(60)
                    } else {
                        NEGATIVE_TTL
                    }
            });
            last_report = Instant::now();
        }
        // Reload on SIGHUP or a changed file: the VIPs, muxes and peers (new backends may chain
        // here), and the SNAT split if it changed. A bad file is logged and the old one kept.
        if last_watch.elapsed() >= crate::mux::WATCH_INTERVAL {
            last_watch = Instant::now();
            let digest = crate::control::file_digest(&options.config);
            if digest.is_some() && digest != config_digest {
                reload_requested.store(true, Ordering::Relaxed);
            }
        }
        if reload_requested.swap(false, Ordering::Relaxed) {
            config_digest = crate::control::file_digest(&options.config);
            match Config::load(&options.config)
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
                    }
                    drop(tables);
                    policy = new_policy;
                    tracing::info!("config reloaded");
                }
                Err(e) => tracing::error!(error = %e, "config rejected; the previous one stays"),
            }
        }
    }
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

/// How long an absent-connection answer of sock_diag is trusted.
const NEGATIVE_TTL: Duration = Duration::from_millis(200);
/// Most sock_diag answers remembered.
const KNOWN_CONNECTIONS: usize = 65_536;

/// Mappings per SNAT address.
const SNAT_CAPACITY: usize = 65_536;
/// The routing table egress traffic is steered into the TUN by.
pub const EGRESS_TABLE: &str = "4242";
/// The priority of the agent's policy-routing rules.
const EGRESS_PRIORITY: &str = "4242";

/// The policy routing that steers this host's egress connections into the TUN: for each
/// `agent.egress` prefix, `ip rule add from <address> to <prefix> lookup 4242`, and a default
/// route into the TUN in table 4242. Removed when dropped.
///
/// Why policy routing: only connections *from the host's own address* to the listed
/// destinations are steered, so the server's direct-server-return replies (source = VIP), the
/// agent's own chained packets and the health checks to the host's address are untouched.
///
/// Limitation: a rule with `from` matches only once the source address is chosen. TCP
/// connections and connected UDP sockets choose it before the final route lookup and are
/// steered; an unconnected, unbound UDP socket's `sendto` is routed with no source yet and
/// leaves from the host's own address, un-translated. Where that matters, mark such traffic in
/// nftables' `type route hook output` chain (which routes again after the mark) instead.
/// The default routes in table 4242 go with the TUN (it is not persistent: it disappears when
/// the agent exits, and its routes with it).
struct EgressRoutes {
    rules: Vec<Vec<String>>,
}

fn ip(args: &[String]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl EgressRoutes {
    fn install(config: &Config, shared: &Shared, tun: &str) -> Result<Self, String> {
        let mut routes = Self { rules: Vec::new() };
        let egress = config
            .agent
            .as_ref()
            .map_or(&[][..], |a| a.egress.as_slice());
        if egress.is_empty() {
            return Ok(routes);
        }
        if shared
            .snat
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
        {
            return Err(
                "agent.egress is set, but this host is a backend of no [[snat]] address".into(),
            );
        }
        for family in ["-4", "-6"] {
            let has = egress
                .iter()
                .any(|p| (family == "-4") == p.addr().is_ipv4());
            if !has {
                continue;
            }
            let route: Vec<String> = [
                family,
                "route",
                "replace",
                "default",
                "dev",
                tun,
                "table",
                EGRESS_TABLE,
            ]
            .map(str::to_owned)
            .to_vec();
            ip(&route)?;
        }
        for prefix in egress {
            for address in &shared.addresses {
                if address.is_ipv4() != prefix.addr().is_ipv4() {
                    continue;
                }
                let rule: Vec<String> = [
                    "rule".to_owned(),
                    "add".to_owned(),
                    "from".to_owned(),
                    address.to_string(),
                    "to".to_owned(),
                    prefix.to_string(),
                    "lookup".to_owned(),
                    EGRESS_TABLE.to_owned(),
                    "priority".to_owned(),
                    EGRESS_PRIORITY.to_owned(),
                ]
                .to_vec();
                let mut add = vec![if prefix.addr().is_ipv4() { "-4" } else { "-6" }.to_owned()];
                add.extend(rule);
                ip(&add)?;
                routes.rules.push(add);
            }
        }
        tracing::info!(rules = routes.rules.len(), "egress SNAT steering installed");
        Ok(routes)
    }
}

impl Drop for EgressRoutes {
    fn drop(&mut self) {
        for rule in &self.rules {
            let mut del = rule.clone();
            if let Some(verb) = del.iter_mut().find(|a| *a == "add") {
                *verb = "del".to_owned();
            }
            let _ = ip(&del);
        }
    }
}

/// What [`snat_inbound`] did with a delivered packet.
enum SnatInbound {
    /// Not return traffic of an egress connection: deliver as it is.
    NotSnat,
    /// Translated into the scratch buffer (this many bytes): deliver that.
    Translated(usize),
    /// To one of this host's SNAT ports, but no mapping: drop.
    NoMapping,
}

fn snat_inbound(shared: &Shared, inner: &[u8], scratch: &mut [u8]) -> SnatInbound {
    let Some((dst, port)) = transport_destination(inner) else {
        return SnatInbound::NotSnat;
    };
    let mut tables = shared.snat.lock().unwrap_or_else(PoisonError::into_inner);
    let Some(table) = tables
        .iter_mut()
        .find(|t| t.snat_address() == dst && t.is_mine(port))
    else {
        return SnatInbound::NotSnat;
    };
    let Some(buf) = scratch.get_mut(..inner.len()) else {
        return SnatInbound::NoMapping;
    };
    buf.copy_from_slice(inner);
    match table.translate_inbound(buf, crate::worker::monotonic_ns()) {
        Ok(_) => SnatInbound::Translated(inner.len()),
        Err(_) => SnatInbound::NoMapping,
    }
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
/// source to a VIP and a port of this host's ranges, and sends it.
fn snat_outbound_loop(shared: &Shared, tun: &Tun) {
    let Ok(mut tx) = RawIpTransmitter::open(BATCH_FRAMES) else {
        tracing::error!("egress SNAT: cannot open raw sockets; egress connections will fail");
        return;
    };
    let mut counters = AgentCounters::default();
    let mut buf = vec![0u8; 65_535];
    let mut last_expire = Instant::now();
    while !shared.stopping() {
        let len = match tun.read_packet(&mut buf, POLL_TIMEOUT) {
            Ok(Some(len)) => len,
            Ok(None) => 0,
            Err(e) => {
                tracing::warn!(error = %e, "TUN read failed");
                thread::sleep(POLL_TIMEOUT);
                0
            }
        };
        if len > 0
            && let Some(packet) = buf.get_mut(..len)
        {
            let now = crate::worker::monotonic_ns();
            let version_v4 = packet.first().is_some_and(|b| b >> 4 == 4);
            let mut tables = shared.snat.lock().unwrap_or_else(PoisonError::into_inner);
            let result = tables
                .iter_mut()
                .find(|t| t.snat_address().is_ipv4() == version_v4)
                .map(|t| t.translate_outbound(packet, now));
            drop(tables);
            match result {
                Some(Ok(t)) => {
                    if t.new_mapping {
                        counters.snat_new_mappings += 1;
                    }
                    let to = t.remote.ip();
                    if tx.queue(packet, to).is_ok() && tx.flush().is_ok_and(|r| r.failed == 0) {
                        counters.snat_outbound += 1;
                    } else {
                        counters.snat_outbound_failed += 1;
                    }
                }
                Some(Err(SnatError::Exhausted)) => {
                    counters.snat_outbound_failed += 1;
                    counters.snat_exhausted += 1;
                    if counters.snat_exhausted.is_power_of_two() {
                        tracing::warn!(
                            count = counters.snat_exhausted,
                            "egress SNAT: this host's port ranges are exhausted; new connections fail"
                        );
                    }
                }
                // Not TCP/UDP, the other family, link-local chatter on the TUN: not ours.
                Some(Err(_)) | None => counters.snat_outbound_failed += 1,
            }
        }
        if last_expire.elapsed() >= REPORT_INTERVAL {
            let now = crate::worker::monotonic_ns();
            for t in shared
                .snat
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter_mut()
            {
                t.expire(now, 1024);
            }
            *shared
                .snat_outbound
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = counters;
            last_expire = Instant::now();
        }
    }
    *shared
        .snat_outbound
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = counters;
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
    counter!("lb_agent_snat_translations_total", "direction" => "outbound")
        .absolute(c.snat_outbound);
    counter!("lb_agent_snat_translations_total", "direction" => "inbound").absolute(c.snat_inbound);
    counter!("lb_agent_snat_new_mappings_total").absolute(c.snat_new_mappings);
    counter!("lb_agent_snat_outbound_failed_total").absolute(c.snat_outbound_failed);
    counter!("lb_agent_snat_exhausted_total").absolute(c.snat_exhausted);
    counter!("lb_agent_snat_inbound_misses_total").absolute(c.snat_inbound_misses);
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
