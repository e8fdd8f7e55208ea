//! `lb healthcheck`: the sidecar next to a mux. It probes every backend of every VIP (and each
//! backend's agent), pushes health to the muxes, and decides whether this node announces its
//! VIPs by BGP.
//!
//! Threads:
//! - **probes** (the caller's thread): the [`Engine`] loop. A (VIP, backend) pair is healthy
//!   only while its service check (`[vip.check]`) *and* its agent's check
//!   (`[healthcheck.agent_check]`) are healthy after rise/fall dampening; a missing check
//!   counts as passing. Each change goes to every publisher.
//! - **one publisher per mux**: a persistent connection to the mux's control socket. On
//!   connecting (the first time, after the mux restarted, after any error) it sends the full
//!   state with `sync-health`; then each round of changes; when idle, an empty `sync-health`
//!   every [`PUBLISH_TICK`] notices a lost connection.
//! - **BGP** (with `[healthcheck.bgp]`): every `decide_interval_ms` it asks the local mux
//!   (`node.control_socket`) for its workers' liveness (`workers`, which never waits for a
//!   table rebuild). The node is healthy while the mux answers and every worker reported within
//!   `worker_stall_ms`; it turns unhealthy after two failed checks in a row, and
//!   starts unhealthy. A VIP address is announced while the node is healthy and every VIP on the
//!   address has at least one healthy backend of weight > 0 whose checks have answered since
//!   the sidecar started; otherwise it is withdrawn. The speaker is ExaBGP (this process is
//!   its API process; routes go out as lines on standard output) or BIRD (`birdc
//!   enable|disable <protocol>`).
//! - the control socket (`status`) and the Prometheus exporter.
//!
//! **Invariants.** A mux never keeps a state older than the sidecar's last change once a
//! connection to it stands: full state on every new connection, and pairs the mux's config
//! lacks are re-sent every tick until it has them. Every request fits the control socket's
//! line, whatever the names. An address is announced only
//! after a positive decision in this process's lifetime, and on SIGTERM/SIGINT every address is
//! withdrawn before exiting, so no announcement outlives its monitor by choice. (If the
//! sidecar is killed, BIRD keeps the last state; see the README.)

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use lb_core::check::{BgpConfig, HealthcheckConfig, Speaker};
use lb_core::config::Config;
use lb_dataplane::control::HealthEntry;
use lb_dataplane::process::RunOptions;
use lb_dataplane::socket::{ControlClient, ControlHandler, ControlSocket};
use lb_dataplane::watch::{Change, ConfigWatch};
use serde_json::{Value, json};

use crate::engine::{Engine, EngineOptions, ProbeSpec, TargetId};

/// How often an idle publisher checks its connection (and retries a lost one).
pub const PUBLISH_TICK: Duration = Duration::from_millis(250);
/// How long a mux may take to answer one request.
const MUX_TIMEOUT: Duration = Duration::from_secs(1);
/// The most bytes of pairs in one `sync-health` request: half the control socket's line limit
/// ([`lb_dataplane::socket::MAX_LINE`]), whatever the names and addresses.
const SYNC_LINE_BYTES: usize = lb_dataplane::socket::MAX_LINE / 2;
/// How often the view for `status` and the metrics is refreshed from the engine.
const VIEW_REFRESH: Duration = Duration::from_millis(200);
/// Consecutive failed node checks before the node counts as unhealthy (one slow answer, such
/// as during a large table rebuild, must not withdraw every node at once).
const NODE_FAILURES: u32 = 2;
/// How long `birdc` may take.
const BIRDC_TIMEOUT: Duration = Duration::from_secs(2);
/// After a speaker failed for an address, the next attempt waits this long.
const SPEAKER_RETRY: Duration = Duration::from_secs(1);
/// BIRD's state is asserted again this often even without a change (BIRD may have restarted).
const BIRD_REASSERT: Duration = Duration::from_secs(5);

/// One (VIP, backend) pair of the config and the engine targets that decide its health.
#[derive(Clone, Debug)]
struct Pair {
    vip: String,
    backend: IpAddr,
    weight: u32,
    service: Option<TargetId>,
    agent: Option<TargetId>,
}

/// What the sidecar checks, derived from a config.
#[derive(Debug)]
struct Plan {
    pairs: Vec<Pair>,
    specs: Vec<ProbeSpec>,
}

/// The engine's `vip` label of an agent target.
const AGENT_LABEL: &str = "(agent)";

impl Plan {
    fn from_config(config: &Config, section: &HealthcheckConfig) -> Self {
        let mut specs = Vec::new();
        let mut agents: BTreeMap<IpAddr, TargetId> = BTreeMap::new();
        let mut pairs = Vec::new();
        for vip in &config.vips {
            for b in &vip.backends {
                let service = vip.check.as_ref().map(|check| {
                    specs.push(ProbeSpec {
                        vip: vip.name.clone(),
                        backend: b.address,
                        // Validation demands check.port for an all-ports VIP.
                        port: vip.check_port().unwrap_or(0),
                        check: check.clone(),
                    });
                    TargetId(specs.len() - 1)
                });
                let agent = section.agent_check.as_ref().map(|check| {
                    *agents.entry(b.address).or_insert_with(|| {
                        specs.push(ProbeSpec {
                            vip: AGENT_LABEL.to_owned(),
                            backend: section.agent_address(b.address),
                            port: check.port.unwrap_or(0),
                            check: check.clone(),
                        });
                        TargetId(specs.len() - 1)
                    })
                });
                pairs.push(Pair {
                    vip: vip.name.clone(),
                    backend: b.address,
                    weight: b.weight,
                    service,
                    agent,
                });
            }
        }
        Self { pairs, specs }
    }

    fn healthy(&self, engine: &Engine, pair: &Pair) -> bool {
        [pair.service, pair.agent]
            .into_iter()
            .flatten()
            .all(|t| engine.target(t).healthy)
    }
}

/// A check's state as `status` shows it.
#[derive(Clone, Debug, Default)]
struct CheckView {
    check: String,
    address: String,
    healthy: bool,
    last_success: Option<bool>,
    last_latency_ms: Option<f64>,
    last_error: Option<String>,
    last_age_ms: Option<u64>,
    successes: u64,
    failures: u64,
    transitions: u64,
}

impl CheckView {
    fn json(&self) -> Value {
        json!({
            "check": self.check,
            "address": self.address,
            "healthy": self.healthy,
            "last_success": self.last_success,
            "last_latency_ms": self.last_latency_ms,
            "last_error": self.last_error,
            "last_age_ms": self.last_age_ms,
            "successes": self.successes,
            "failures": self.failures,
            "transitions": self.transitions,
        })
    }
}

#[derive(Clone, Debug)]
struct PairView {
    vip: String,
    backend: IpAddr,
    weight: u32,
    healthy: bool,
    /// Every check of the pair has a result (since this sidecar started).
    probed: bool,
    service: Option<CheckView>,
    agent: Option<CheckView>,
}

#[derive(Clone, Debug, Default)]
struct MuxView {
    socket: PathBuf,
    connected: bool,
    full_syncs: u64,
    updates: u64,
    last_error: Option<String>,
}

#[derive(Clone, Debug, Default)]
struct BgpView {
    speaker: String,
    node_healthy: bool,
    reason: String,
    /// Per address: (announced, why).
    addresses: BTreeMap<IpAddr, (bool, String)>,
}

#[derive(Debug, Default)]
struct View {
    pairs: Vec<PairView>,
    muxes: Vec<MuxView>,
    bgp: Option<BgpView>,
}

struct Shared {
    node: String,
    config_path: PathBuf,
    stopping: AtomicBool,
    view: Mutex<View>,
}

impl Shared {
    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    fn status(&self) -> Value {
        let view = self.view();
        let pairs: Vec<Value> = view
            .pairs
            .iter()
            .map(|p| {
                json!({
                    "vip": p.vip,
                    "backend": p.backend,
                    "healthy": p.healthy,
                    "service": p.service.as_ref().map(CheckView::json),
                    "agent": p.agent.as_ref().map(CheckView::json),
                })
            })
            .collect();
        let muxes: Vec<Value> = view
            .muxes
            .iter()
            .map(|m| {
                json!({
                    "socket": m.socket,
                    "connected": m.connected,
                    "full_syncs": m.full_syncs,
                    "updates": m.updates,
                    "last_error": m.last_error,
                })
            })
            .collect();
        let bgp = view.bgp.as_ref().map(|b| {
            json!({
                "speaker": b.speaker,
                "node_healthy": b.node_healthy,
                "reason": b.reason,
                "addresses": b.addresses.iter().map(|(a, (announced, why))| json!({
                    "address": a, "announced": announced, "reason": why,
                })).collect::<Vec<_>>(),
            })
        });
        json!({
            "ok": true,
            "role": "healthcheck",
            "node": self.node,
            "config": self.config_path,
            "backends": pairs,
            "muxes": muxes,
            "bgp": bgp,
        })
    }
}

impl ControlHandler for Shared {
    fn handle_line(&self, line: &str) -> Value {
        match lb_dataplane::socket::status_request(line, "health-check sidecar") {
            Ok(()) => self.status(),
            Err(answer) => answer,
        }
    }

    fn stopping(&self) -> bool {
        Shared::stopping(self)
    }
}

/// Loads the config and its `[healthcheck]` section.
/// A config as loaded, with the digest of the exact bytes parsed (a change after the read is
/// noticed by the next look at the file).
struct Loaded {
    config: Config,
    section: HealthcheckConfig,
    digest: Option<u64>,
}

/// Reads and validates the config and its `[healthcheck]` section. On error, also the digest
/// of what was read, so that a bad file is reported once, not at every look.
fn load(path: &Path) -> Result<Loaded, (String, Option<u64>)> {
    let bytes = lb_core::config::read_config_file(path)
        .map_err(|e| (format!("{}: {e}", path.display()), None))?;
    let digest = lb_dataplane::watch::digest(&bytes);
    load_bytes(path, bytes, digest)
}

/// [`load`] of contents already read (by the file watcher).
fn load_bytes(path: &Path, bytes: Vec<u8>, digest: u64) -> Result<Loaded, (String, Option<u64>)> {
    let digest = Some(digest);
    let config = Config::from_bytes(bytes, path).map_err(|e| (e.to_string(), digest))?;
    config
        .check_role(lb_core::config::Role::Healthcheck, path)
        .map_err(|e| (e.to_string(), digest))?;
    // check_role refused a config without it.
    let Some(section) = config.healthcheck.clone() else {
        return Err((
            format!("{}: no [healthcheck] section", path.display()),
            digest,
        ));
    };
    Ok(Loaded {
        config,
        section,
        digest,
    })
}

/// A target's identity across reloads: its VIP (or the agent label) and address. A changed
/// check keeps the state: a dead backend must not count as healthy again for `fall` probes
/// because its check's timing was edited.
type TargetKey = (String, IpAddr);

fn target_key(spec: &ProbeSpec) -> TargetKey {
    (spec.vip.clone(), spec.backend)
}

/// How one generation (one config) ended.
enum Ended {
    Stop,
    Reload {
        loaded: Box<Loaded>,
        states: BTreeMap<TargetKey, bool>,
        bgp: Option<BgpCarry>,
    },
}

/// What the BGP thread hands to the next generation: its speaker and what it applied.
struct BgpCarry {
    config: BgpConfig,
    speaker: Box<dyn Announcer>,
    applied: BTreeMap<IpAddr, (bool, Instant)>,
}

/// Runs `lb healthcheck` until SIGTERM or SIGINT. Reloads its config on SIGHUP and when the
/// file's contents change: a bad file is logged and the old config keeps running; a good one
/// carries every check's state over (same VIP and backend) and re-sends the full state to the
/// muxes.
pub fn run(options: &RunOptions) -> Result<(), String> {
    let mut loaded = load(&options.config).map_err(|(e, _)| e)?;
    let (config, section) = (&loaded.config, &loaded.section);
    let shared = Arc::new(Shared {
        node: config.node.name.clone(),
        config_path: options.config.clone(),
        stopping: AtomicBool::new(false),
        view: Mutex::new(View::default()),
    });
    let socket_path = options
        .control_socket
        .clone()
        .unwrap_or_else(|| section.control_socket_path(&config.node.name));
    let _socket =
        ControlSocket::serve(Arc::clone(&shared) as Arc<dyn ControlHandler>, &socket_path)
            .map_err(|e| e.to_string())?;
    if !options.no_metrics {
        lb_dataplane::exporter::install(
            options.metrics_address.unwrap_or(section.metrics_address),
        )?;
    }
    let reload_requested = Arc::new(AtomicBool::new(false));
    {
        let shared = Arc::clone(&shared);
        lb_dataplane::process::handle_signals(Arc::clone(&reload_requested), move || {
            shared.stopping.store(true, Ordering::Relaxed);
        })?;
    }
    tracing::info!(node = %config.node.name, socket = %socket_path.display(), "health-check sidecar starting");
    let mut states: Option<BTreeMap<TargetKey, bool>> = None;
    let mut bgp: Option<BgpCarry> = None;
    loop {
        let ended = serve(
            &shared,
            options,
            &loaded,
            states.take(),
            bgp.take(),
            &reload_requested,
        )?;
        match ended {
            Ended::Stop => break,
            Ended::Reload {
                loaded: new,
                states: carried,
                bgp: carried_bgp,
            } => {
                if new.section.metrics_address != loaded.section.metrics_address
                    || new.section.control_socket != loaded.section.control_socket
                {
                    tracing::warn!(
                        "healthcheck.metrics_address and control_socket change only at restart"
                    );
                }
                loaded = *new;
                states = Some(carried);
                bgp = carried_bgp;
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Runs one config until stop or a good reload.
fn serve(
    shared: &Arc<Shared>,
    options: &RunOptions,
    loaded: &Loaded,
    states: Option<BTreeMap<TargetKey, bool>>,
    previous_bgp: Option<BgpCarry>,
    reload_requested: &AtomicBool,
) -> Result<Ended, String> {
    let (config, section) = (&loaded.config, &loaded.section);
    let plan = Plan::from_config(config, section);
    if plan.specs.is_empty() {
        tracing::warn!(
            "no [vip.check] and no [healthcheck.agent_check]: every backend counts as healthy"
        );
    }
    let local_mux = config.node.control_socket_path();
    let mux_sockets = if section.muxes.is_empty() {
        vec![local_mux.clone()]
    } else {
        section.muxes.clone()
    };
    let mut engine = Engine::new(
        plan.specs.clone(),
        &EngineOptions {
            checker: config.node.name.clone(),
            initially_healthy: true,
        },
    )
    .map_err(|e| format!("probe engine: {e}"))?;
    match &states {
        None => seed_from_mux(&mut engine, &plan, &local_mux),
        Some(states) => {
            let mut kept = 0usize;
            for (i, spec) in plan.specs.iter().enumerate() {
                if let Some(&healthy) = states.get(&target_key(spec)) {
                    engine.seed(TargetId(i), healthy);
                    kept += 1;
                }
            }
            let unhealthy = states.values().filter(|h| !**h).count();
            tracing::info!(
                kept,
                new = plan.specs.len() - kept,
                unhealthy,
                "check states carried over"
            );
        }
    }
    shared.view().muxes = mux_sockets
        .iter()
        .map(|s| MuxView {
            socket: s.clone(),
            ..MuxView::default()
        })
        .collect();
    refresh_view(shared, &engine, &plan);

    let mut health: Vec<bool> = plan
        .pairs
        .iter()
        .map(|p| plan.healthy(&engine, p))
        .collect();
    let entries = |health: &[bool], which: &mut dyn Iterator<Item = usize>| -> Vec<HealthEntry> {
        which
            .map(|i| HealthEntry {
                vip: plan.pairs[i].vip.clone(),
                backend: plan.pairs[i].backend,
                healthy: health[i],
            })
            .collect()
    };
    // Set when this generation ends (stop or reload); its threads leave then.
    let ending = Arc::new(AtomicBool::new(false));
    let mut publishers: Vec<Sender<Vec<HealthEntry>>> = Vec::new();
    let mut threads = Vec::new();
    for (index, path) in mux_sockets.iter().enumerate() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let initial = entries(&health, &mut (0..plan.pairs.len()));
        let shared = Arc::clone(shared);
        let path = path.clone();
        threads.push(
            thread::Builder::new()
                .name(format!("lb-publish-{index}"))
                .spawn(move || publish_loop(&shared, index, &path, &rx, initial))
                .map_err(|e| e.to_string())?,
        );
        publishers.push(tx);
    }
    let mut bgp_thread = None;
    let previous_bgp = match (previous_bgp, &section.bgp) {
        (Some(mut carry), Some(bgp)) if carry.config.speaker == bgp.speaker => {
            if bgp.speaker == Speaker::Bird {
                // BIRD's socket or protocols may have changed: an address whose protocol (or
                // socket) is not the same any more is withdrawn through the old one, and a new
                // speaker takes the new settings.
                let old = &carry.config;
                let moved: Vec<IpAddr> = carry
                    .applied
                    .keys()
                    .filter(|a| {
                        old.bird_socket != bgp.bird_socket
                            || old.bird_protocols.get(a) != bgp.bird_protocols.get(a)
                    })
                    .copied()
                    .collect();
                for address in moved {
                    if let Err(e) = carry.speaker.set(address, false) {
                        tracing::warn!(%address, error = %e, "BGP: cannot withdraw through the old BIRD protocol");
                    }
                    carry.applied.remove(&address);
                }
                carry.speaker = open_speaker(bgp, shared)?;
            }
            Some(carry)
        }
        (Some(mut carry), _) => {
            // Another speaker, or none: nothing stays announced through the old one.
            for address in carry.applied.keys() {
                if let Err(e) = carry.speaker.set(*address, false) {
                    tracing::warn!(%address, error = %e, "BGP: cannot withdraw through the old speaker");
                }
            }
            None
        }
        (None, _) => None,
    };
    shared.view().bgp = None;
    if let Some(bgp) = section.bgp.clone() {
        let (speaker, applied) = match previous_bgp {
            Some(carry) => (carry.speaker, carry.applied),
            None => (open_speaker(&bgp, shared)?, BTreeMap::new()),
        };
        let mut addresses: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
        for vip in &config.vips {
            addresses
                .entry(vip.address)
                .or_default()
                .push(vip.name.clone());
        }
        let shared = Arc::clone(shared);
        let local_mux = local_mux.clone();
        let ending = Arc::clone(&ending);
        bgp_thread = Some(
            thread::Builder::new()
                .name("lb-bgp".into())
                .spawn(move || {
                    let carry = BgpCarry {
                        config: bgp,
                        speaker,
                        applied,
                    };
                    bgp_loop(&shared, &local_mux, &addresses, carry, &ending)
                })
                .map_err(|e| e.to_string())?,
        );
    }
    tracing::info!(
        pairs = plan.pairs.len(),
        probes = engine.probe_count(),
        muxes = mux_sockets.len(),
        bgp = section.bgp.as_ref().map_or("off", |b| match b.speaker {
            Speaker::Exabgp => "exabgp",
            Speaker::Bird => "bird",
        }),
        "health-check sidecar running"
    );

    let mut last_refresh = Instant::now();
    let mut last_watch = Instant::now();
    let mut watch = ConfigWatch::new(&options.config, loaded.digest);
    let mut reload = None;
    let mut failure = None;
    while !shared.stopping() {
        let round = match engine.run_once(Duration::from_millis(100)) {
            Ok(round) => round,
            Err(e) => {
                // Stop as on SIGTERM, so the BGP thread withdraws before the error exits.
                tracing::error!(error = %e, "probe engine failed; stopping");
                failure = Some(format!("probe engine: {e}"));
                shared.stopping.store(true, Ordering::Relaxed);
                break;
            }
        };
        for r in &round.results {
            metrics::counter!(
                "lb_healthcheck_probes_total",
                "result" => if r.success { "success" } else { "failure" }
            )
            .increment(1);
        }
        if !round.transitions.is_empty() {
            for event in &round.transitions {
                let what = if event.vip == AGENT_LABEL {
                    "agent check"
                } else {
                    "service check"
                };
                let probe = engine.probe(engine.target(event.target).probe);
                tracing::info!(
                    vip = %event.vip,
                    backend = %event.backend,
                    healthy = event.transition.healthy(),
                    last_error = %probe.last.and_then(|l| l.error.as_ref()).map_or_else(String::new, ToString::to_string),
                    "{what} changed"
                );
                metrics::counter!(
                    "lb_healthcheck_transitions_total",
                    "vip" => event.vip.clone(),
                    "backend" => event.backend.to_string()
                )
                .increment(1);
            }
            let mut changed = Vec::new();
            for (i, pair) in plan.pairs.iter().enumerate() {
                let now = plan.healthy(&engine, pair);
                if now != health[i] {
                    health[i] = now;
                    changed.push(i);
                    tracing::info!(vip = %pair.vip, backend = %pair.backend, healthy = now, "backend health changed");
                }
            }
            if !changed.is_empty() {
                let update = entries(&health, &mut changed.into_iter());
                for p in &publishers {
                    let _ = p.send(update.clone());
                }
            }
            refresh_view(shared, &engine, &plan);
            last_refresh = Instant::now();
        } else if last_refresh.elapsed() >= VIEW_REFRESH {
            refresh_view(shared, &engine, &plan);
            last_refresh = Instant::now();
        }
        // SIGHUP reads the file now; the watcher offers new contents once the file is
        // complete (never a half-written one).
        let signalled = reload_requested.swap(false, Ordering::Relaxed);
        let attempt = if signalled {
            Some(load(&options.config))
        } else if last_watch.elapsed() >= lb_dataplane::watch::TICK {
            last_watch = Instant::now();
            match watch.poll() {
                Some(Change::Ready(bytes, digest)) => {
                    Some(load_bytes(&options.config, bytes, digest))
                }
                Some(Change::Unreadable(reason)) => {
                    tracing::warn!(file = %options.config.display(), %reason, "config file unreadable; the config in force keeps running");
                    None
                }
                None => None,
            }
        } else {
            None
        };
        match attempt {
            Some(Ok(new)) => {
                tracing::info!(
                    trigger = if signalled { "SIGHUP" } else { "file changed" },
                    "config reloaded"
                );
                metrics::counter!("lb_healthcheck_reloads_total", "result" => "ok").increment(1);
                reload = Some(new);
                break;
            }
            Some(Err((e, read))) => {
                if let Some(d) = read {
                    watch.loaded(d);
                }
                tracing::error!(error = %e, "reload rejected; the old config keeps running");
                metrics::counter!("lb_healthcheck_reloads_total", "result" => "failed")
                    .increment(1);
            }
            None => {}
        }
    }
    ending.store(true, Ordering::Relaxed);
    drop(publishers);
    for t in threads {
        let _ = t.join();
    }
    let bgp = bgp_thread.and_then(|t| t.join().ok()).flatten();
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(match reload {
        None => Ended::Stop,
        Some(new) => Ended::Reload {
            loaded: Box::new(new),
            states: plan
                .specs
                .iter()
                .enumerate()
                .map(|(i, spec)| (target_key(spec), engine.target(TargetId(i)).healthy))
                .collect(),
            bgp,
        },
    })
}

/// Seeds the engine from what the local mux remembers (a restarted sidecar keeps the verdicts
/// of the one before): a pair the mux has unhealthy starts unhealthy.
fn seed_from_mux(engine: &mut Engine, plan: &Plan, local_mux: &Path) {
    let Ok(status) = ControlClient::connect(local_mux, MUX_TIMEOUT)
        .and_then(|mut c| c.ask(&json!({"command": "status"})))
    else {
        tracing::info!(mux = %local_mux.display(), "local mux not answering: every backend starts healthy");
        return;
    };
    let mut unhealthy: BTreeSet<(String, IpAddr)> = BTreeSet::new();
    for vip in status["vips"].as_array().into_iter().flatten() {
        for b in vip["backends"].as_array().into_iter().flatten() {
            if let (Some(name), Some(address), true) = (
                vip["name"].as_str(),
                b["address"].as_str().and_then(|a| a.parse::<IpAddr>().ok()),
                b["healthy"] == false,
            ) {
                unhealthy.insert((name.to_owned(), address));
            }
        }
    }
    let down = |p: &Pair| unhealthy.contains(&(p.vip.clone(), p.backend));
    for pair in plan.pairs.iter().filter(|p| down(p)) {
        if let Some(target) = pair.service {
            engine.seed(target, false);
        }
        // An agent check serves every VIP of its backend: it starts unhealthy only if the mux
        // has the backend unhealthy in all of them (the cause may well be the agent).
        if let Some(target) = pair.agent
            && plan
                .pairs
                .iter()
                .filter(|p| p.agent == Some(target))
                .all(&down)
        {
            engine.seed(target, false);
        }
        tracing::info!(vip = %pair.vip, backend = %pair.backend, "starts unhealthy, as the mux has it");
    }
}

fn check_view(engine: &Engine, target: TargetId, now: Instant) -> CheckView {
    let t = engine.target(target);
    let p = engine.probe(t.probe);
    CheckView {
        check: p.kind.to_string(),
        address: p.addr.to_string(),
        healthy: t.healthy,
        last_success: p.last.map(|l| l.success),
        last_latency_ms: p.last.map(|l| l.latency.as_secs_f64() * 1000.0),
        last_error: p
            .last
            .and_then(|l| l.error.as_ref())
            .map(ToString::to_string),
        last_age_ms: p
            .last
            .map(|l| u64::try_from(now.duration_since(l.at).as_millis()).unwrap_or(u64::MAX)),
        successes: p.successes,
        failures: p.failures,
        transitions: t.transitions,
    }
}

/// Copies the engine's state into the view (for `status`) and the metrics.
fn refresh_view(shared: &Shared, engine: &Engine, plan: &Plan) {
    let now = Instant::now();
    let pairs: Vec<PairView> = plan
        .pairs
        .iter()
        .map(|p| {
            let service = p.service.map(|t| check_view(engine, t, now));
            let agent = p.agent.map(|t| check_view(engine, t, now));
            let healthy = plan.healthy(engine, p);
            let probed = [&service, &agent]
                .into_iter()
                .flatten()
                .all(|c| c.last_success.is_some());
            let labels = [("vip", p.vip.clone()), ("backend", p.backend.to_string())];
            metrics::gauge!("lb_healthcheck_backend_healthy", &labels)
                .set(f64::from(u8::from(healthy)));
            for (kind, view) in [("service", &service), ("agent", &agent)] {
                if let Some(latency) = view.as_ref().and_then(|v| v.last_latency_ms) {
                    metrics::gauge!(
                        "lb_healthcheck_probe_latency_seconds",
                        "vip" => p.vip.clone(),
                        "backend" => p.backend.to_string(),
                        "check" => kind
                    )
                    .set(latency / 1000.0);
                }
            }
            PairView {
                vip: p.vip.clone(),
                backend: p.backend,
                weight: p.weight,
                healthy,
                probed,
                service,
                agent,
            }
        })
        .collect();
    shared.view().pairs = pairs;
}

/// The request lines of a `sync-health` of `entries`: as many pairs per line as fit in
/// [`SYNC_LINE_BYTES`] (the control socket reads lines of up to 64 KiB), at least one line.
fn sync_requests(entries: &[HealthEntry]) -> Vec<String> {
    let line = |pairs: &[String]| {
        format!(
            "{{\"command\":\"sync-health\",\"backends\":[{}]}}",
            pairs.join(",")
        )
    };
    let mut lines = Vec::new();
    let mut pairs: Vec<String> = Vec::new();
    let mut bytes = 0;
    for e in entries {
        let pair = serde_json::to_string(e).unwrap_or_default();
        if bytes + pair.len() + 1 > SYNC_LINE_BYTES && !pairs.is_empty() {
            lines.push(line(&pairs));
            pairs.clear();
            bytes = 0;
        }
        bytes += pair.len() + 1;
        pairs.push(pair);
    }
    if !pairs.is_empty() || lines.is_empty() {
        lines.push(line(&pairs));
    }
    lines
}

/// Sends `entries` to a mux; returns the pairs its config lacks. The mux's refusal is an error.
fn sync(client: &mut ControlClient, entries: &[HealthEntry]) -> io::Result<Vec<(String, IpAddr)>> {
    let mut ignored = Vec::new();
    for request in sync_requests(entries) {
        let answer = client.ask_line(&request)?;
        if answer["ok"] != true {
            return Err(io::Error::other(format!(
                "the mux refused the health update: {}",
                answer["error"].as_str().unwrap_or("?")
            )));
        }
        for pair in answer["ignored"].as_array().into_iter().flatten() {
            if let (Some(vip), Some(backend)) = (
                pair["vip"].as_str(),
                pair["backend"].as_str().and_then(|b| b.parse().ok()),
            ) {
                ignored.push((vip.to_owned(), backend));
            }
        }
    }
    Ok(ignored)
}

/// One mux's publisher: see the module docs.
fn publish_loop(
    shared: &Shared,
    index: usize,
    path: &Path,
    updates: &Receiver<Vec<HealthEntry>>,
    initial: Vec<HealthEntry>,
) {
    let key = |e: &HealthEntry| (e.vip.clone(), e.backend);
    let mut desired: BTreeMap<(String, IpAddr), HealthEntry> =
        initial.into_iter().map(|e| (key(&e), e)).collect();
    let mut pending: BTreeMap<(String, IpAddr), HealthEntry> = BTreeMap::new();
    let mut ignored: Vec<(String, IpAddr)> = Vec::new();
    let mut client: Option<ControlClient> = None;
    let mut last_error: Option<String> = None;
    let mut note =
        |shared: &Shared, connected: bool, error: Option<String>, full: bool, update: bool| {
            if error != last_error {
                match &error {
                    Some(e) => {
                        tracing::warn!(mux = %path.display(), error = %e, "cannot publish health");
                    }
                    None if last_error.is_some() => {
                        tracing::info!(mux = %path.display(), "publishing health again");
                    }
                    None => {}
                }
                last_error.clone_from(&error);
            }
            let mut view = shared.view();
            if let Some(m) = view.muxes.get_mut(index) {
                m.connected = connected;
                m.full_syncs += u64::from(full);
                m.updates += u64::from(update);
                if error.is_some() {
                    m.last_error = error;
                }
            }
            metrics::gauge!("lb_healthcheck_mux_connected", "socket" => path.display().to_string())
                .set(f64::from(u8::from(connected)));
        };
    loop {
        match updates.recv_timeout(PUBLISH_TICK) {
            Ok(batch) => {
                for e in batch.into_iter().chain(updates.try_iter().flatten()) {
                    desired.insert(key(&e), e.clone());
                    pending.insert(key(&e), e);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if shared.stopping() {
            return;
        }
        if let Some(c) = client.as_mut() {
            let batch: Vec<HealthEntry> = pending.values().cloned().collect();
            match sync(c, &batch) {
                Ok(lacking) => {
                    let update = pending.len() > ignored.len();
                    pending.clear();
                    keep_ignored(&desired, lacking, &mut ignored, &mut pending, path);
                    note(shared, true, None, false, update);
                }
                Err(e) => {
                    client = None;
                    note(shared, false, Some(e.to_string()), false, false);
                }
            }
            continue;
        }
        let full: Vec<HealthEntry> = desired.values().cloned().collect();
        match ControlClient::connect(path, MUX_TIMEOUT)
            .and_then(|mut c| sync(&mut c, &full).map(|lacking| (c, lacking)))
        {
            Ok((c, lacking)) => {
                tracing::info!(mux = %path.display(), pairs = full.len(), "sent the full health state");
                client = Some(c);
                pending.clear();
                keep_ignored(&desired, lacking, &mut ignored, &mut pending, path);
                note(shared, true, None, true, false);
            }
            Err(e) => note(shared, false, Some(e.to_string()), false, false),
        }
    }
}

/// Pairs a mux's config lacks stay pending, so they are sent with every later request (each
/// tick) until the mux knows them: a mux that reloads after the sidecar gets their health at
/// once instead of taking them as healthy. Logged when the set changes.
fn keep_ignored(
    desired: &BTreeMap<(String, IpAddr), HealthEntry>,
    lacking: Vec<(String, IpAddr)>,
    ignored: &mut Vec<(String, IpAddr)>,
    pending: &mut BTreeMap<(String, IpAddr), HealthEntry>,
    path: &Path,
) {
    if lacking != *ignored {
        if lacking.is_empty() {
            tracing::info!(mux = %path.display(), "the mux now has every pair of the config");
        } else {
            let pairs: Vec<String> = lacking.iter().map(|(v, b)| format!("{v}/{b}")).collect();
            tracing::warn!(mux = %path.display(), pairs = ?pairs, "the mux's config lacks these pairs (reloaded on one side only?); resending them until it has them");
        }
    }
    for k in &lacking {
        if let Some(e) = desired.get(k) {
            pending.insert(k.clone(), e.clone());
        }
    }
    *ignored = lacking;
}

/// A BGP speaker the sidecar drives.
trait Announcer: Send {
    /// `speaker` in the config.
    fn name(&self) -> &'static str;
    /// Announces or withdraws `address`.
    fn set(&mut self, address: IpAddr, announce: bool) -> Result<(), String>;
    /// How often the state is asserted again without a change (`None`: only on changes).
    fn reassert(&self) -> Option<Duration>;
    /// The speaker is gone for good (ExaBGP closed our pipe): the sidecar stops.
    fn gone(&self) -> bool {
        false
    }
}

/// The ExaBGP API line that announces or withdraws `address` (as a host route).
#[must_use]
pub fn exabgp_line(address: IpAddr, announce: bool) -> String {
    let length = if address.is_ipv4() { 32 } else { 128 };
    let verb = if announce { "announce" } else { "withdraw" };
    format!("{verb} route {address}/{length} next-hop self\n")
}

/// ExaBGP: this process is its API process; commands go to standard output.
struct ExaBgp {
    out: File,
    gone: bool,
}

impl Announcer for ExaBgp {
    fn name(&self) -> &'static str {
        "exabgp"
    }
    fn set(&mut self, address: IpAddr, announce: bool) -> Result<(), String> {
        let written = self
            .out
            .write_all(exabgp_line(address, announce).as_bytes())
            .and_then(|()| self.out.flush());
        written.map_err(|e| {
            self.gone |= e.kind() == io::ErrorKind::BrokenPipe;
            format!("standard output (ExaBGP's pipe): {e}")
        })
    }
    fn reassert(&self) -> Option<Duration> {
        None
    }
    fn gone(&self) -> bool {
        self.gone
    }
}

/// BIRD: one protocol per address, enabled or disabled through `birdc`.
struct Bird {
    socket: PathBuf,
    protocols: BTreeMap<IpAddr, String>,
}

impl Announcer for Bird {
    fn name(&self) -> &'static str {
        "bird"
    }
    fn set(&mut self, address: IpAddr, announce: bool) -> Result<(), String> {
        let protocol = self
            .protocols
            .get(&address)
            .ok_or_else(|| format!("no BIRD protocol for {address}"))?;
        let verb = if announce { "enable" } else { "disable" };
        let output = birdc(&self.socket, &[verb, protocol])?;
        let text = String::from_utf8_lossy(&output.stdout);
        let done = if announce { "enabled" } else { "disabled" };
        if output.status.success()
            && text
                .lines()
                .any(|l| l.starts_with(&format!("{protocol}:")) && l.contains(done))
        {
            Ok(())
        } else {
            Err(format!(
                "birdc -s {} {verb} {protocol}: {} {}",
                self.socket.display(),
                text.trim(),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
    fn reassert(&self) -> Option<Duration> {
        Some(BIRD_REASSERT)
    }
}

/// Runs `birdc -s socket args...`, killing it after [`BIRDC_TIMEOUT`] (a hung BIRD must not
/// hold the BGP thread: its other addresses, and the withdrawals at exit, wait for it).
fn birdc(socket: &Path, args: &[&str]) -> Result<std::process::Output, String> {
    use wait_timeout::ChildExt as _;
    let mut child = Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("birdc: {e} (is BIRD installed?)"))?;
    match child.wait_timeout(BIRDC_TIMEOUT) {
        Ok(Some(_)) => child.wait_with_output().map_err(|e| format!("birdc: {e}")),
        Ok(None) | Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "birdc -s {} {}: no answer within {BIRDC_TIMEOUT:?}",
                socket.display(),
                args.join(" ")
            ))
        }
    }
}

fn open_speaker(bgp: &BgpConfig, shared: &Arc<Shared>) -> Result<Box<dyn Announcer>, String> {
    Ok(match bgp.speaker {
        Speaker::Exabgp => {
            watch_exabgp(shared);
            // Written through a duplicate of fd 1, not `io::stdout()`: its lock may be held
            // by the caller, and nothing else of this process writes to standard output.
            let fd = io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("standard output: {e}"))?;
            Box::new(ExaBgp {
                out: File::from(fd),
                gone: false,
            })
        }
        Speaker::Bird => Box::new(Bird {
            socket: bgp.bird_socket.clone(),
            protocols: bgp.bird_protocols.clone(),
        }),
    })
}

/// ExaBGP closes the API process's standard input when it stops: the sidecar stops too (it
/// would otherwise outlive its speaker, announcing into nothing). Started once per process.
fn watch_exabgp(shared: &Arc<Shared>) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name("lb-exabgp-stdin".into())
            .spawn(move || {
                // ExaBGP's messages (none are asked for) are read and ignored.
                let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
                tracing::warn!("standard input closed: ExaBGP stopped; stopping");
                shared.stopping.store(true, Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot watch ExaBGP's pipe");
        }
    });
}

/// Whether the local mux is serving: it answers `workers` and every worker reported lately.
fn node_health(
    client: &mut Option<ControlClient>,
    path: &Path,
    stall_ms: u32,
) -> Result<(), String> {
    if client.is_none() {
        *client = Some(ControlClient::connect(path, MUX_TIMEOUT).map_err(|e| e.to_string())?);
    }
    let answer = client
        .as_mut()
        .map(|c| c.ask(&json!({"command": "workers"})))
        .unwrap_or_else(|| Err(io::Error::other("not connected")));
    let status = match answer {
        Ok(s) => s,
        Err(e) => {
            *client = None;
            return Err(format!("the mux does not answer: {e}"));
        }
    };
    if status["ok"] != true {
        return Err(format!("the mux answers an error: {}", status["error"]));
    }
    let workers = status["workers"].as_array().map_or(&[][..], Vec::as_slice);
    if workers.is_empty() {
        return Err("the mux has no workers".into());
    }
    for w in workers {
        match w["last_seen_ms"].as_u64() {
            Some(ms) if ms <= u64::from(stall_ms) => {}
            Some(ms) => {
                return Err(format!(
                    "worker {} stalled: last report {ms} ms ago",
                    w["id"]
                ));
            }
            None => return Err(format!("worker {} has not reported yet", w["id"])),
        }
    }
    Ok(())
}

/// Per VIP address: announce, and why (or why not). A backend of weight 0 (drained) does not
/// make a VIP servable, nor does one whose checks have not answered yet (every check starts
/// healthy, so a new node would otherwise attract traffic before it knows anything).
fn decide(
    view: &View,
    plan_addresses: &BTreeMap<IpAddr, Vec<String>>,
    node: &Result<(), String>,
) -> BTreeMap<IpAddr, (bool, String)> {
    plan_addresses
        .iter()
        .map(|(address, vips)| {
            if let Err(e) = node {
                return (*address, (false, format!("node unhealthy: {e}")));
            }
            let empty: Vec<&String> = vips
                .iter()
                .filter(|vip| {
                    !view
                        .pairs
                        .iter()
                        .any(|p| &p.vip == *vip && p.healthy && p.probed && p.weight > 0)
                })
                .collect();
            if empty.is_empty() {
                (
                    *address,
                    (
                        true,
                        "node healthy, every VIP has a healthy backend".to_owned(),
                    ),
                )
            } else {
                (
                    *address,
                    (
                        false,
                        format!("no healthy (and probed) backend for VIP {empty:?}"),
                    ),
                )
            }
        })
        .collect()
}

/// The BGP thread: see the module docs. Returns its speaker and state to the next generation
/// on a reload; on stop, withdraws everything and returns `None`.
fn bgp_loop(
    shared: &Shared,
    local_mux: &Path,
    addresses: &BTreeMap<IpAddr, Vec<String>>,
    carry: BgpCarry,
    ending: &AtomicBool,
) -> Option<BgpCarry> {
    let BgpCarry {
        config: bgp,
        mut speaker,
        mut applied,
    } = carry;
    // Addresses the previous config announced and this one lacks.
    let gone: Vec<IpAddr> = applied
        .keys()
        .filter(|a| !addresses.contains_key(a))
        .copied()
        .collect();
    for address in gone {
        match speaker.set(address, false) {
            Ok(()) => {
                tracing::info!(%address, "BGP: withdrawn, no VIP has this address any more");
                applied.remove(&address);
            }
            Err(e) => tracing::warn!(%address, error = %e, "BGP: cannot withdraw"),
        }
    }
    let interval = Duration::from_millis(u64::from(bgp.decide_interval_ms));
    let mut client = None;
    // Unhealthy until the mux first answers; then only after NODE_FAILURES failures in a row.
    let mut failures = NODE_FAILURES;
    let mut last_error: Option<String> = None;
    let mut retry_at: BTreeMap<IpAddr, Instant> = BTreeMap::new();
    let mut speaker_errors: BTreeMap<IpAddr, String> = BTreeMap::new();
    while !ending.load(Ordering::Relaxed) && !shared.stopping() {
        let started = Instant::now();
        let node = match node_health(&mut client, local_mux, bgp.worker_stall_ms) {
            Ok(()) => {
                failures = 0;
                last_error = None;
                Ok(())
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures < NODE_FAILURES {
                    tracing::debug!(error = %e, "node check failed once");
                    Ok(())
                } else {
                    if last_error.as_ref() != Some(&e) {
                        tracing::warn!(error = %e, "node unhealthy");
                        last_error = Some(e.clone());
                    }
                    Err(e)
                }
            }
        };
        let decisions = decide(&shared.view(), addresses, &node);
        for (address, (announce, why)) in &decisions {
            let due = match applied.get(address) {
                Some((done, at)) => {
                    done != announce
                        || speaker
                            .reassert()
                            .is_some_and(|every| at.elapsed() >= every)
                }
                None => true,
            };
            if !due || retry_at.get(address).is_some_and(|at| Instant::now() < *at) {
                continue;
            }
            let changed = applied
                .get(address)
                .is_none_or(|(done, _)| done != announce);
            match speaker.set(*address, *announce) {
                Ok(()) => {
                    if changed {
                        tracing::info!(%address, announce, reason = %why, speaker = speaker.name(), "BGP");
                    }
                    applied.insert(*address, (*announce, Instant::now()));
                    retry_at.remove(address);
                    if speaker_errors.remove(address).is_some() {
                        tracing::info!(%address, "BGP speaker works again");
                    }
                    metrics::gauge!("lb_healthcheck_announced", "address" => address.to_string())
                        .set(f64::from(u8::from(*announce)));
                }
                Err(e) if speaker.gone() => {
                    tracing::error!(%address, error = %e, "BGP speaker gone; stopping");
                    shared.stopping.store(true, Ordering::Relaxed);
                    return None;
                }
                Err(e) => {
                    if speaker_errors.get(address) != Some(&e) {
                        tracing::warn!(%address, announce, error = %e, "BGP speaker failed; retrying every {SPEAKER_RETRY:?}");
                        speaker_errors.insert(*address, e);
                    }
                    applied.remove(address);
                    retry_at.insert(*address, Instant::now() + SPEAKER_RETRY);
                }
            }
        }
        metrics::gauge!("lb_healthcheck_node_healthy").set(f64::from(u8::from(node.is_ok())));
        shared.view().bgp = Some(BgpView {
            speaker: speaker.name().to_owned(),
            node_healthy: node.is_ok(),
            reason: node
                .err()
                .unwrap_or_else(|| "the mux answers and its workers run".into()),
            addresses: decisions
                .into_iter()
                .map(|(a, (want, why))| {
                    let announced = applied.get(&a).is_some_and(|(done, _)| *done);
                    let why = if announced == want {
                        why
                    } else {
                        format!("{why} (speaker not updated yet)")
                    };
                    (a, (announced, why))
                })
                .collect(),
        });
        if let Some(rest) = interval.checked_sub(started.elapsed()) {
            thread::sleep(rest);
        }
    }
    if !shared.stopping() {
        return Some(BgpCarry {
            config: bgp,
            speaker,
            applied,
        });
    }
    for address in addresses.keys() {
        match speaker.set(*address, false) {
            Ok(()) => tracing::info!(%address, "BGP: withdrawn at exit"),
            Err(e) => tracing::warn!(%address, error = %e, "BGP: cannot withdraw at exit"),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_requests_fit_the_control_socket_line_whatever_the_names() {
        let name = "v".repeat(lb_core::config::MAX_VIP_NAME);
        let entries: Vec<HealthEntry> = (0..5000u32)
            .map(|i| HealthEntry {
                vip: format!("{name}{}", i % 7),
                backend: IpAddr::from([
                    0x2001, 0xdb8, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, i as u16,
                ]),
                healthy: i % 3 == 0,
            })
            .collect();
        let lines = sync_requests(&entries);
        assert!(lines.len() > 1);
        let mut back = Vec::new();
        for line in &lines {
            assert!(
                line.len() < lb_dataplane::socket::MAX_LINE,
                "{} bytes",
                line.len()
            );
            let request: lb_dataplane::control::Request = serde_json::from_str(line).unwrap();
            let lb_dataplane::control::Request::SyncHealth { backends } = request else {
                panic!("not a sync-health: {line}");
            };
            back.extend(backends);
        }
        assert_eq!(back, entries, "every pair once, in order");
        assert_eq!(
            sync_requests(&[]),
            [r#"{"command":"sync-health","backends":[]}"#]
        );
    }

    #[test]
    fn exabgp_lines_are_host_routes() {
        assert_eq!(
            exabgp_line("198.18.100.1".parse().unwrap(), true),
            "announce route 198.18.100.1/32 next-hop self\n"
        );
        assert_eq!(
            exabgp_line("2001:2:0:100::1".parse().unwrap(), false),
            "withdraw route 2001:2:0:100::1/128 next-hop self\n"
        );
    }

    fn pair(vip: &str, healthy: bool) -> PairView {
        PairView {
            vip: vip.into(),
            backend: "198.18.21.2".parse().unwrap(),
            weight: 1,
            healthy,
            probed: true,
            service: None,
            agent: None,
        }
    }

    #[test]
    fn an_address_is_announced_only_if_the_node_and_every_vip_on_it_can_serve() {
        let a: IpAddr = "198.18.100.1".parse().unwrap();
        let addresses = BTreeMap::from([(a, vec!["web".to_owned(), "echo".to_owned()])]);
        let mut view = View {
            pairs: vec![pair("web", true), pair("web", false), pair("echo", true)],
            ..View::default()
        };
        assert!(decide(&view, &addresses, &Ok(()))[&a].0);
        assert!(!decide(&view, &addresses, &Err("mux down".into()))[&a].0);
        view.pairs[2].healthy = false;
        let (announce, why) = decide(&view, &addresses, &Ok(())).remove(&a).unwrap();
        assert!(!announce);
        assert!(why.contains("echo"), "{why}");
    }
}
