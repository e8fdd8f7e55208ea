//! The probe engine: one mio event loop running every probe of the sidecar on one thread.
//!
//! **Model.** The engine is built from [`ProbeSpec`]s, one per (VIP, backend) pair to check.
//! Specs with the same address, port and check (kind, interval, timeout, jitter) are
//! **deduplicated** into one probe: a backend serving several VIPs on one port with one check is
//! probed once, and each result feeds every (VIP, backend) *target* that uses it. Each target
//! has its own [`HealthState`] damper, since rise and fall (which do not change what goes on the
//! wire) may differ between them.
//!
//! **Loop.** [`Engine::run_once`] waits (at most `max_wait`) for socket readiness or the next
//! timer, drives every ready probe as far as it can go without blocking, then handles due
//! timers: probe starts and probe deadlines. mio has no timers, so they live in a binary heap
//! of deadlines; entries are never removed, a stale one (its attempt already over) is skipped
//! when it comes up. A probe has at most one attempt in flight, so a slow backend can never pile
//! up sockets; the token of a socket is its probe's index.
//!
//! **Probes.** All sockets are non-blocking:
//! - TCP: `connect` is started; when the socket turns writable, `take_error` / `peer_addr` tell
//!   whether it connected. Success: connected before the deadline.
//! - HTTP: over that connection, `GET path HTTP/1.1` with `Host` and `Connection: close` is
//!   written, then bytes are read up to the end of the status line (at most
//!   [`MAX_STATUS_LINE`] bytes). Success: the status code is the expected one.
//! - UDP: a connected UDP socket sends the payload; success: a reply starting with the expected
//!   prefix before the deadline. The socket being connected, an ICMP port unreachable comes
//!   back as `ECONNREFUSED` and fails the probe at once; only the backend can answer.
//!
//! The deadline (the check's timeout) covers the whole attempt, connect included.
//!
//! **Schedule and jitter.** Each probe has an identity hash: xxh3 (with [`JITTER_SEED`]) of the
//! checker's name, the address and the check. Its first start is at `hash mod interval` after
//! the engine is built, so thousands of probes are spread over the first interval instead of
//! firing together. After that, round `n` starts `interval ± jitter` after round `n - 1`'s
//! scheduled start, the offset being `xxh3(identity ‖ n)` mapped onto
//! `[-interval·jitter%, +interval·jitter%]` (millisecond steps). The jitter is deterministic
//! (a rerun with the same config probes with the same offsets, which makes tests and traces
//! reproducible) but differs between probes and, through the checker's name, between the
//! sidecars of different nodes probing the same backend, so their probes do not align. If a
//! start comes due while the previous attempt still runs (timeout close to a shrunk
//! interval), the next attempt starts when that one ends.
//!
//! **Invariant.** Every started attempt ends exactly once (success, failure or deadline), and
//! yields exactly one [`ProbeResult`]; its socket is deregistered and closed then.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use lb_core::hash::{fast_range, xxh3};
use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};

use crate::check::{CheckConfig, CheckKind};
use crate::damper::{HealthState, Transition};

/// Seed of the probe identity hash that sets each probe's phase and jitter (ASCII "lbhcjitt").
///
/// Like the seeds of `lb_core::hash` it is fixed, so the schedule does not depend on the
/// process or the Rust release; it only spreads probes in time, so unlike those it does not
/// have to agree across the fleet.
pub const JITTER_SEED: u64 = 0x6c62_6863_6a69_7474;

/// The most bytes read from an HTTP answer to find its status line.
pub const MAX_STATUS_LINE: usize = 1024;

/// Readiness events taken from the kernel per poll.
const EVENTS_CAPACITY: usize = 1024;

/// One (VIP, backend) pair to check, with the port already resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    /// The VIP's name.
    pub vip: String,
    /// The backend's address.
    pub backend: IpAddr,
    /// The port probed on the backend (the check's port, or the VIP's).
    pub port: u16,
    /// The check.
    pub check: CheckConfig,
}

/// Index of a (deduplicated) probe in the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeId(pub usize);

/// Index of a target, in the order of the specs given to [`Engine::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetId(pub usize);

/// Why a probe failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeError {
    /// No (complete) answer before the check's timeout.
    Timeout,
    /// Connection refused (TCP reset, or ICMP port unreachable for UDP).
    Refused,
    /// An HTTP answer with another status than the expected one.
    HttpStatus(u16),
    /// An answer that does not start with an HTTP status line.
    HttpMalformed,
    /// The connection was closed before a complete status line.
    ClosedEarly,
    /// A UDP reply that does not start with the expected bytes.
    UnexpectedReply,
    /// Another socket error, as the OS worded it.
    Io(String),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout => f.write_str("timed out"),
            Self::Refused => f.write_str("connection refused"),
            Self::HttpStatus(s) => write!(f, "HTTP status {s}"),
            Self::HttpMalformed => f.write_str("answer is not an HTTP status line"),
            Self::ClosedEarly => f.write_str("connection closed before a status line"),
            Self::UnexpectedReply => f.write_str("unexpected UDP reply"),
            Self::Io(e) => f.write_str(e),
        }
    }
}

impl From<io::Error> for ProbeError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::ConnectionRefused {
            Self::Refused
        } else {
            Self::Io(e.to_string())
        }
    }
}

/// The outcome of one probe attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeResult {
    /// The probe.
    pub probe: ProbeId,
    /// Whether the check passed.
    pub success: bool,
    /// From the start of the attempt to its end (the timeout, for a timed-out probe).
    pub latency: Duration,
    /// Why it failed; `None` on success.
    pub error: Option<ProbeError>,
    /// When it ended.
    pub at: Instant,
}

/// A dampened health change of one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    /// The target.
    pub target: TargetId,
    /// Its VIP.
    pub vip: String,
    /// Its backend.
    pub backend: IpAddr,
    /// The change.
    pub transition: Transition,
}

/// What one [`Engine::run_once`] produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Every attempt that ended, in the order they ended.
    pub results: Vec<ProbeResult>,
    /// Every health change those results caused, in order.
    pub transitions: Vec<HealthEvent>,
}

/// Settings of an engine beyond its probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// This checker's name (the node's), mixed into the jitter so that the sidecars of
    /// different nodes do not probe a backend in step.
    pub checker: String,
    /// The state targets start in. `true` (the default): a backend is trusted until `fall`
    /// failures, so a restarting sidecar does not drain a working fleet.
    pub initially_healthy: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            checker: String::new(),
            initially_healthy: true,
        }
    }
}

/// What goes on the wire, plus timing: the deduplication key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ProbeKey {
    addr: SocketAddr,
    kind: CheckKind,
    interval_ms: u32,
    timeout_ms: u32,
    jitter_percent: u32,
}

enum TcpPhase {
    Connecting,
    Writing { written: usize },
    Reading { buf: Vec<u8> },
}

enum Conn {
    Tcp { stream: TcpStream, phase: TcpPhase },
    Udp { socket: UdpSocket },
}

struct Attempt {
    /// The scheduled start (the base of the next one).
    scheduled: Instant,
    started: Instant,
    conn: Conn,
}

struct Probe {
    key: ProbeKey,
    identity: u64,
    /// The HTTP request, built once.
    request: Vec<u8>,
    interval_ms: u32,
    jitter_ms: u32,
    timeout: Duration,
    /// Attempts started so far; numbers the current one.
    round: u64,
    attempt: Option<Attempt>,
    /// When the next attempt is due, while none runs.
    next_start: Instant,
    targets: Vec<TargetId>,
    last: Option<ProbeResult>,
    successes: u64,
    failures: u64,
}

struct Target {
    spec: ProbeSpec,
    probe: ProbeId,
    state: HealthState,
    transitions: u64,
    last_transition: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Start,
    Deadline,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Instant,
    probe: usize,
    round: u64,
    kind: TimerKind,
}

/// A probe's state for `lb status`.
#[derive(Clone, Copy, Debug)]
pub struct ProbeStatus<'a> {
    /// The address and port probed.
    pub addr: SocketAddr,
    /// What the probe does.
    pub kind: &'a CheckKind,
    /// The targets it feeds.
    pub targets: &'a [TargetId],
    /// The last finished attempt.
    pub last: Option<&'a ProbeResult>,
    /// Attempts that succeeded.
    pub successes: u64,
    /// Attempts that failed.
    pub failures: u64,
}

/// A target's state for `lb status`.
#[derive(Clone, Copy, Debug)]
pub struct TargetStatus<'a> {
    /// The spec it was built from.
    pub spec: &'a ProbeSpec,
    /// The probe feeding it.
    pub probe: ProbeId,
    /// Its dampened health.
    pub healthy: bool,
    /// Health changes so far.
    pub transitions: u64,
    /// When the last one happened.
    pub last_transition: Option<Instant>,
}

/// The probe engine; see the module documentation.
pub struct Engine {
    poll: Poll,
    events: Events,
    ready: Vec<usize>,
    probes: Vec<Probe>,
    targets: Vec<Target>,
    timers: BinaryHeap<Reverse<Timer>>,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("probes", &self.probes.len())
            .field("targets", &self.targets.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Builds an engine for `specs` (target `i` is `specs[i]`), deduplicating identical
    /// probes, and schedules each probe's first start within its first interval. Fails only
    /// if the poller cannot be created.
    pub fn new(specs: Vec<ProbeSpec>, options: &EngineOptions) -> io::Result<Self> {
        let now = Instant::now();
        let mut by_key: BTreeMap<ProbeKey, usize> = BTreeMap::new();
        let mut probes: Vec<Probe> = Vec::new();
        let mut targets = Vec::with_capacity(specs.len());
        for (i, spec) in specs.into_iter().enumerate() {
            let check = &spec.check;
            let key = ProbeKey {
                addr: SocketAddr::new(spec.backend, spec.port),
                kind: check.kind.clone(),
                interval_ms: check.interval_ms,
                timeout_ms: check.timeout_ms,
                jitter_percent: check.jitter_percent,
            };
            let index = *by_key.entry(key.clone()).or_insert_with(|| {
                probes.push(Probe::new(key, &options.checker, now));
                probes.len() - 1
            });
            probes[index].targets.push(TargetId(i));
            targets.push(Target {
                state: HealthState::new(options.initially_healthy, check.rise, check.fall),
                spec,
                probe: ProbeId(index),
                transitions: 0,
                last_transition: None,
            });
        }
        let timers = probes
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Reverse(Timer {
                    at: p.next_start,
                    probe: i,
                    round: 0,
                    kind: TimerKind::Start,
                })
            })
            .collect();
        Ok(Self {
            poll: Poll::new()?,
            events: Events::with_capacity(EVENTS_CAPACITY),
            ready: Vec::new(),
            probes,
            targets,
            timers,
        })
    }

    /// The number of distinct probes (after deduplication).
    #[must_use]
    pub fn probe_count(&self) -> usize {
        self.probes.len()
    }

    /// The number of targets (one per spec).
    #[must_use]
    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    /// The state of probe `id`. Panics if `id` is not one of this engine's.
    #[must_use]
    pub fn probe(&self, id: ProbeId) -> ProbeStatus<'_> {
        let p = &self.probes[id.0];
        ProbeStatus {
            addr: p.key.addr,
            kind: &p.key.kind,
            targets: &p.targets,
            last: p.last.as_ref(),
            successes: p.successes,
            failures: p.failures,
        }
    }

    /// The state of target `id`. Panics if `id` is not one of this engine's.
    #[must_use]
    pub fn target(&self, id: TargetId) -> TargetStatus<'_> {
        let t = &self.targets[id.0];
        TargetStatus {
            spec: &t.spec,
            probe: t.probe,
            healthy: t.state.healthy(),
            transitions: t.transitions,
            last_transition: t.last_transition,
        }
    }

    /// Sets target `id`'s state with a fresh streak (a sidecar that restarts takes over what
    /// the mux remembers, instead of trusting a dead backend again for `fall` probes). Not a
    /// transition: nothing is reported. Panics if `id` is not one of this engine's.
    pub fn seed(&mut self, id: TargetId, healthy: bool) {
        let t = &mut self.targets[id.0];
        t.state = HealthState::new(healthy, t.spec.check.rise, t.spec.check.fall);
    }

    /// Attempts in flight now.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.probes.iter().filter(|p| p.attempt.is_some()).count()
    }

    /// Waits at most `max_wait` for sockets or timers, then drives every ready probe, ends the
    /// attempts past their deadline and starts the ones due. Returns the results and
    /// transitions of this round (often none).
    pub fn run_once(&mut self, max_wait: Duration) -> io::Result<Round> {
        let mut round = Round::default();
        let now = Instant::now();
        let wait = match self.timers.peek() {
            Some(Reverse(t)) => t.at.saturating_duration_since(now).min(max_wait),
            None => max_wait,
        };
        match self.poll.poll(&mut self.events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        self.ready.clear();
        self.ready.extend(self.events.iter().map(|e| e.token().0));
        for i in 0..self.ready.len() {
            let index = self.ready[i];
            self.drive(index, &mut round);
        }
        self.fire_timers(Instant::now(), &mut round);
        Ok(round)
    }

    /// Pops every timer due at `now`: deadlines fail their attempt, starts begin one.
    fn fire_timers(&mut self, now: Instant, round: &mut Round) {
        while let Some(Reverse(timer)) = self.timers.peek().copied() {
            if timer.at > now {
                break;
            }
            self.timers.pop();
            let probe = &self.probes[timer.probe];
            match timer.kind {
                TimerKind::Deadline => {
                    if probe.attempt.is_some() && probe.round == timer.round {
                        self.finish(timer.probe, Err(ProbeError::Timeout), round);
                    }
                }
                TimerKind::Start => {
                    if probe.attempt.is_none() {
                        self.start(timer.probe, timer.at, now, round);
                    }
                }
            }
        }
    }

    /// Starts an attempt of probe `index` scheduled at `scheduled`.
    fn start(&mut self, index: usize, scheduled: Instant, now: Instant, round: &mut Round) {
        let registry = self.poll.registry();
        let token = Token(index);
        let probe = &mut self.probes[index];
        probe.round += 1;
        let addr = probe.key.addr;
        let conn = match &probe.key.kind {
            CheckKind::Tcp | CheckKind::Http { .. } => {
                TcpStream::connect(addr).and_then(|mut stream| {
                    registry.register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    Ok(Conn::Tcp {
                        stream,
                        phase: TcpPhase::Connecting,
                    })
                })
            }
            CheckKind::Udp { send, .. } => {
                let local: IpAddr = if addr.is_ipv4() {
                    Ipv4Addr::UNSPECIFIED.into()
                } else {
                    Ipv6Addr::UNSPECIFIED.into()
                };
                UdpSocket::bind(SocketAddr::new(local, 0)).and_then(|mut socket| {
                    socket.connect(addr)?;
                    registry.register(&mut socket, token, Interest::READABLE)?;
                    socket.send(send.as_bytes())?;
                    Ok(Conn::Udp { socket })
                })
            }
        };
        let timer = Timer {
            at: now + probe.timeout,
            probe: index,
            round: probe.round,
            kind: TimerKind::Deadline,
        };
        match conn {
            Ok(conn) => {
                probe.attempt = Some(Attempt {
                    scheduled,
                    started: now,
                    conn,
                });
                self.timers.push(Reverse(timer));
            }
            Err(e) => {
                // Failed before anything was in flight (no route, no file descriptors...):
                // the attempt ends as it starts.
                self.finish_unopened(index, scheduled, now, e.into(), round);
            }
        }
    }

    /// Records a failure of an attempt that could not even get a socket.
    fn finish_unopened(
        &mut self,
        index: usize,
        scheduled: Instant,
        now: Instant,
        error: ProbeError,
        round: &mut Round,
    ) {
        let probe = &mut self.probes[index];
        let result = ProbeResult {
            probe: ProbeId(index),
            success: false,
            latency: Duration::ZERO,
            error: Some(error),
            at: now,
        };
        probe.failures += 1;
        probe.last = Some(result.clone());
        round.results.push(result);
        self.feed_targets(index, false, now, round);
        self.schedule_next(index, scheduled, now);
    }

    /// Drives the attempt of probe `index` as far as it goes without blocking.
    fn drive(&mut self, index: usize, round: &mut Round) {
        let probe = &mut self.probes[index];
        let Some(attempt) = probe.attempt.as_mut() else {
            return; // A late event of a finished attempt.
        };
        let outcome = match &mut attempt.conn {
            Conn::Tcp { stream, phase } => {
                drive_tcp(stream, phase, &probe.key.kind, &probe.request)
            }
            Conn::Udp { socket } => match &probe.key.kind {
                CheckKind::Udp { expect, .. } => drive_udp(socket, expect.as_bytes()),
                _ => Some(Err(ProbeError::Io(
                    "internal: UDP socket for a TCP check".into(),
                ))),
            },
        };
        if let Some(outcome) = outcome {
            self.finish(index, outcome, round);
        }
    }

    /// Ends the current attempt of probe `index` with `outcome`, feeds the targets and
    /// schedules the next attempt.
    fn finish(&mut self, index: usize, outcome: Result<(), ProbeError>, round: &mut Round) {
        let now = Instant::now();
        let probe = &mut self.probes[index];
        let Some(mut attempt) = probe.attempt.take() else {
            return;
        };
        let registry = self.poll.registry();
        // Deregistering can only fail for a socket that was never registered; it is closed
        // right after anyway.
        let _ = match &mut attempt.conn {
            Conn::Tcp { stream, .. } => registry.deregister(stream),
            Conn::Udp { socket } => registry.deregister(socket),
        };
        drop(attempt.conn);
        let success = outcome.is_ok();
        let result = ProbeResult {
            probe: ProbeId(index),
            success,
            latency: now.saturating_duration_since(attempt.started),
            error: outcome.err(),
            at: now,
        };
        if success {
            probe.successes += 1;
        } else {
            probe.failures += 1;
        }
        probe.last = Some(result.clone());
        round.results.push(result);
        self.feed_targets(index, success, now, round);
        self.schedule_next(index, attempt.scheduled, now);
    }

    fn feed_targets(&mut self, index: usize, success: bool, now: Instant, round: &mut Round) {
        for &id in &self.probes[index].targets {
            let target = &mut self.targets[id.0];
            if let Some(transition) = target.state.observe(success) {
                target.transitions += 1;
                target.last_transition = Some(now);
                round.transitions.push(HealthEvent {
                    target: id,
                    vip: target.spec.vip.clone(),
                    backend: target.spec.backend,
                    transition,
                });
            }
        }
    }

    /// Schedules the attempt after the one scheduled at `scheduled`: one jittered interval
    /// later, or now if that is already past.
    fn schedule_next(&mut self, index: usize, scheduled: Instant, now: Instant) {
        let probe = &mut self.probes[index];
        let at = (scheduled + probe.jittered_interval(probe.round + 1)).max(now);
        probe.next_start = at;
        self.timers.push(Reverse(Timer {
            at,
            probe: index,
            round: probe.round + 1,
            kind: TimerKind::Start,
        }));
    }
}

impl Probe {
    fn new(key: ProbeKey, checker: &str, now: Instant) -> Self {
        let identity = xxh3(
            format!(
                "{checker}\n{}\n{}\n{}\n{}\n{}",
                key.addr, key.kind, key.interval_ms, key.timeout_ms, key.jitter_percent
            )
            .as_bytes(),
            JITTER_SEED,
        );
        let request = match &key.kind {
            CheckKind::Http { path, host, .. } => {
                let host = host.clone().unwrap_or_else(|| key.addr.to_string());
                format!(
                    "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-healthcheck\r\nAccept: */*\r\nConnection: close\r\n\r\n"
                )
                .into_bytes()
            }
            _ => Vec::new(),
        };
        let interval_ms = key.interval_ms.max(1);
        let phase = fast_range(identity, interval_ms);
        Self {
            identity,
            request,
            interval_ms,
            // At most 3_600_000 × 100 / 100: fits a u32.
            jitter_ms: u32::try_from(
                u64::from(interval_ms) * u64::from(key.jitter_percent.min(100)) / 100,
            )
            .unwrap_or(interval_ms),
            timeout: Duration::from_millis(u64::from(key.timeout_ms)),
            round: 0,
            attempt: None,
            next_start: now + Duration::from_millis(u64::from(phase)),
            targets: Vec::new(),
            last: None,
            successes: 0,
            failures: 0,
            key,
        }
    }

    /// The time between the scheduled starts of rounds `round - 1` and `round`.
    fn jittered_interval(&self, round: u64) -> Duration {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.identity.to_le_bytes());
        bytes[8..].copy_from_slice(&round.to_le_bytes());
        let spread = 2 * self.jitter_ms + 1;
        let offset =
            i64::from(fast_range(xxh3(&bytes, JITTER_SEED), spread)) - i64::from(self.jitter_ms);
        let ms = (i64::from(self.interval_ms) + offset).max(1);
        Duration::from_millis(ms.unsigned_abs())
    }
}

/// One step of a TCP or HTTP attempt: `None` while it waits for the socket.
fn drive_tcp(
    stream: &mut TcpStream,
    phase: &mut TcpPhase,
    kind: &CheckKind,
    request: &[u8],
) -> Option<Result<(), ProbeError>> {
    loop {
        match phase {
            TcpPhase::Connecting => {
                match stream.take_error() {
                    Ok(Some(e)) | Err(e) => return Some(Err(e.into())),
                    Ok(None) => {}
                }
                match stream.peer_addr() {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => return None,
                    Err(e) => return Some(Err(e.into())),
                }
                let CheckKind::Http { .. } = kind else {
                    return Some(Ok(()));
                };
                *phase = TcpPhase::Writing { written: 0 };
            }
            TcpPhase::Writing { written } => match stream.write(&request[*written..]) {
                Ok(n) => {
                    *written += n;
                    if *written == request.len() {
                        *phase = TcpPhase::Reading {
                            buf: Vec::with_capacity(256),
                        };
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e.into())),
            },
            TcpPhase::Reading { buf } => {
                let mut chunk = [0u8; 512];
                let room = (MAX_STATUS_LINE - buf.len()).min(chunk.len());
                match stream.read(&mut chunk[..room]) {
                    Ok(0) => {
                        return Some(match status_line(buf) {
                            Some(status) => http_verdict(kind, status),
                            None => Err(ProbeError::ClosedEarly),
                        });
                    }
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(status) = status_line(buf) {
                            return Some(http_verdict(kind, status));
                        }
                        if buf.len() >= MAX_STATUS_LINE {
                            return Some(Err(ProbeError::HttpMalformed));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Some(Err(e.into())),
                }
            }
        }
    }
}

/// The status code of a complete status line at the start of `buf`: `Some(Err(()))` for a
/// complete line that is not one, `None` while the line is incomplete.
fn status_line(buf: &[u8]) -> Option<Result<u16, ()>> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ());
    Some(line.and_then(|line| {
        let mut words = line.trim_end_matches('\r').split(' ');
        let version = words.next().unwrap_or("");
        let code = words.next().unwrap_or("");
        if version.starts_with("HTTP/") && code.len() == 3 {
            code.parse().map_err(|_| ())
        } else {
            Err(())
        }
    }))
}

fn http_verdict(kind: &CheckKind, status: Result<u16, ()>) -> Result<(), ProbeError> {
    let CheckKind::Http { expect_status, .. } = kind else {
        return Ok(());
    };
    match status {
        Ok(s) if s == *expect_status => Ok(()),
        Ok(s) => Err(ProbeError::HttpStatus(s)),
        Err(()) => Err(ProbeError::HttpMalformed),
    }
}

/// One step of a UDP attempt: `None` while no reply is there.
fn drive_udp(socket: &UdpSocket, expect: &[u8]) -> Option<Result<(), ProbeError>> {
    let mut buf = [0u8; 2048];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                return Some(if buf[..n].starts_with(expect) {
                    Ok(())
                } else {
                    Err(ProbeError::UnexpectedReply)
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Some(Err(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_line(b"HTTP/1.1 200 OK\r\n"), Some(Ok(200)));
        assert_eq!(
            status_line(b"HTTP/1.0 503 Service Unavailable\r\nX: y"),
            Some(Ok(503))
        );
        assert_eq!(status_line(b"HTTP/1.1 204\n"), Some(Ok(204)));
        assert_eq!(status_line(b"HTTP/1.1 200 O"), None);
        assert_eq!(status_line(b"SSH-2.0-OpenSSH\r\n"), Some(Err(())));
        assert_eq!(status_line(b"HTTP/1.1 2000 OK\r\n"), Some(Err(())));
    }

    fn key(port: u16, interval_ms: u32, jitter_percent: u32) -> ProbeKey {
        ProbeKey {
            addr: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port),
            kind: CheckKind::Tcp,
            interval_ms,
            timeout_ms: 100,
            jitter_percent,
        }
    }

    #[test]
    fn jitter_stays_within_bounds_and_is_deterministic() {
        let now = Instant::now();
        let p = Probe::new(key(80, 1000, 10), "node-a", now);
        let again = Probe::new(key(80, 1000, 10), "node-a", now);
        let mut seen = std::collections::BTreeSet::new();
        for round in 1..2000 {
            let d = p.jittered_interval(round);
            assert_eq!(d, again.jittered_interval(round));
            assert!((900..=1100).contains(&d.as_millis()), "{d:?}");
            seen.insert(d.as_millis());
        }
        assert!(
            seen.len() > 100,
            "jitter should vary: {} values",
            seen.len()
        );
        let none = Probe::new(key(80, 1000, 0), "node-a", now);
        assert_eq!(none.jittered_interval(7), Duration::from_secs(1));
    }

    #[test]
    fn phases_spread_over_the_interval_and_differ_between_checkers() {
        let now = Instant::now();
        let phase = |port, checker| {
            Probe::new(key(port, 1000, 10), checker, now)
                .next_start
                .duration_since(now)
                .as_millis()
        };
        // 1000 probes over 10 buckets of 100 ms: each holds a fair share.
        let mut buckets = [0u32; 10];
        for port in 0..1000 {
            let ms = phase(10_000 + port, "node-a");
            assert!(ms < 1000);
            buckets[usize::try_from(ms / 100).unwrap()] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (50..=150).contains(&n)),
            "{buckets:?}"
        );
        let differ = (0..100)
            .filter(|&port| phase(10_000 + port, "node-a") != phase(10_000 + port, "node-b"))
            .count();
        assert!(differ > 90, "{differ}");
    }

    #[test]
    fn identical_specs_share_a_probe() {
        let check = CheckConfig::default();
        let spec = |vip: &str, port| ProbeSpec {
            vip: vip.into(),
            backend: Ipv4Addr::LOCALHOST.into(),
            port,
            check: check.clone(),
        };
        let slower = ProbeSpec {
            check: CheckConfig {
                rise: 5,
                ..check.clone()
            },
            ..spec("c", 80)
        };
        let other_kind = ProbeSpec {
            check: CheckConfig {
                kind: CheckKind::Http {
                    path: "/".into(),
                    host: None,
                    expect_status: 200,
                },
                ..check.clone()
            },
            ..spec("d", 80)
        };
        let engine = Engine::new(
            vec![
                spec("a", 80),
                spec("b", 80),
                slower,
                spec("a", 81),
                other_kind,
            ],
            &EngineOptions::default(),
        )
        .unwrap();
        assert_eq!(engine.target_count(), 5);
        // a:80, b:80 and c:80 (only rise differs) share one probe; :81 and http are others.
        assert_eq!(engine.probe_count(), 3);
        assert_eq!(
            engine.probe(ProbeId(0)).targets,
            [TargetId(0), TargetId(1), TargetId(2)]
        );
        assert_eq!(engine.target(TargetId(3)).probe, ProbeId(1));
        assert_eq!(engine.target(TargetId(4)).probe, ProbeId(2));
    }
}
