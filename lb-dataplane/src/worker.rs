//! The mux worker loop: receive a batch, decide each frame with [`lb_core::forward::process`],
//! queue what is sent, flush the batch, repeat.
//!
//! Each worker owns its [`WorkerState`] (connection table, counters) and its devices; the only
//! thing shared on the hot path is the read-only [`Snapshot`], loaded from the [`Shared`]
//! arc-swap once per batch, so every packet of a batch sees one config. Conntrack lives in the
//! worker, so it survives reloads; a flow whose backend left the table falls back to the table
//! (`forward` checks that with the backend's tag).
//!
//! **Invariants.**
//! - Per packet: no allocation, no lock, no syscall. Per batch: one snapshot load, one clock
//!   read, one flush (at most one `sendmmsg` per address family), a `poll` when idle.
//! - Every [`REPORT_INTERVAL`] the worker publishes a [`WorkerReport`] with `try_lock`: it never
//!   waits for a reader; if the report is busy it publishes next time.
//! - On shutdown the worker finishes its batch, flushes, publishes a last report and returns.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use lb_core::conntrack::{ConnCounters, ConnTable, ConnTableConfig, Occupancy};
use lb_core::forward::{self, Action, Counters, WorkerState};
use lb_core::snapshot::Snapshot;

use crate::device::{Receiver, Transmitter, ip_destination};

/// Most frames a worker takes in one batch.
pub const BATCH_FRAMES: usize = 64;
/// How long an idle worker waits for frames before it looks at the shutdown flag again.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// How often a worker publishes its [`WorkerReport`].
pub const REPORT_INTERVAL: Duration = Duration::from_millis(100);
/// Output buffer size: the largest IP packet plus the largest encapsulation overhead.
const OUT_BUFFER: usize = 65_535 + 48;

/// What the workers share: the published snapshot and the shutdown flag.
#[derive(Debug)]
pub struct Shared {
    /// The config snapshot in force; replaced whole by the control plane.
    pub snapshot: ArcSwap<Snapshot>,
    /// Set to make every worker finish its batch, flush and return.
    pub shutdown: AtomicBool,
}

impl Shared {
    /// Shared state serving `snapshot`.
    #[must_use]
    pub fn new(snapshot: Snapshot) -> Arc<Self> {
        Arc::new(Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            shutdown: AtomicBool::new(false),
        })
    }
}

/// A backend of a VIP, named the way reports and metrics name it (stable across reloads).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// The VIP's name.
    pub vip: String,
    /// The backend's address.
    pub backend: IpAddr,
}

/// Packets and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Packets.
    pub packets: u64,
    /// Bytes of the frames as received.
    pub bytes: u64,
}

impl Traffic {
    fn add(&mut self, other: Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// What a worker publishes at batch boundaries: cumulative since it started.
#[derive(Clone, Debug, Default)]
pub struct WorkerReport {
    /// The forwarding counters (frames, encapsulated, passed, drops by reason).
    pub counters: Counters,
    /// Connection-table events.
    pub conntrack: ConnCounters,
    /// Connection-table occupancy (None before the first report).
    pub occupancy: Option<Occupancy>,
    /// Batches with at least one frame.
    pub batches: u64,
    /// The largest batch seen.
    pub largest_batch: u64,
    /// Packets the kernel accepted for sending.
    pub sent: u64,
    /// Packets the kernel refused to send (no route, too big, ...).
    pub send_failed: u64,
    /// Frames the kernel dropped before the worker saw them (receive ring full).
    pub kernel_drops: u64,
    /// Errors of the device itself (receive or flush failed as a whole).
    pub device_errors: u64,
    /// The snapshot generation the worker last used.
    pub generation: u64,
    /// When the worker last went round its loop: it is alive and making progress.
    pub heartbeat: Option<Instant>,
    /// Encapsulated traffic per backend.
    pub backends: HashMap<BackendKey, Traffic>,
}

/// A running worker: its report and its thread.
#[derive(Debug)]
pub struct WorkerHandle {
    /// The worker's number, from 0.
    pub id: usize,
    /// What it last published.
    pub report: Arc<Mutex<WorkerReport>>,
    thread: JoinHandle<()>,
}

impl WorkerHandle {
    /// Waits for the worker to return (after [`Shared::shutdown`] is set).
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!(worker = self.id, "worker thread panicked");
        }
    }
}

/// Nanoseconds on a monotonic clock shared by all workers and the control plane (never 0):
/// the `now` of [`lb_core::forward::process`].
#[must_use]
pub fn monotonic_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_add(1_000_000_000)
}

/// Starts worker `id` on its own devices, with a connection table of `conntrack` size.
pub fn spawn(
    id: usize,
    receiver: Box<dyn Receiver>,
    transmitter: Box<dyn Transmitter>,
    conntrack: ConnTableConfig,
    shared: Arc<Shared>,
) -> io::Result<WorkerHandle> {
    let report = Arc::new(Mutex::new(WorkerReport::default()));
    let published = Arc::clone(&report);
    let thread = thread::Builder::new()
        .name(format!("lb-worker-{id}"))
        .spawn(move || {
            let state = WorkerState::new(ConnTable::new(conntrack));
            run(id, receiver, transmitter, state, &shared, &published);
        })?;
    Ok(WorkerHandle { id, report, thread })
}

/// Per-backend traffic of the snapshot in use, by VIP index then backend index.
struct TrafficBySlot {
    snapshot: Arc<Snapshot>,
    traffic: Vec<Vec<Traffic>>,
}

impl TrafficBySlot {
    fn new(snapshot: Arc<Snapshot>) -> Self {
        let traffic = snapshot
            .vips
            .iter()
            .map(|v| vec![Traffic::default(); v.table.backends().len()])
            .collect();
        Self { snapshot, traffic }
    }

    #[inline]
    fn count(&mut self, vip: u16, backend: u16, bytes: usize) {
        if let Some(t) = self
            .traffic
            .get_mut(usize::from(vip))
            .and_then(|v| v.get_mut(usize::from(backend)))
        {
            t.packets += 1;
            t.bytes += bytes as u64;
        }
    }

    /// Moves the counts into `into`, named by VIP and backend address.
    fn drain_into(&mut self, into: &mut HashMap<BackendKey, Traffic>) {
        for (vip, counts) in self.snapshot.vips.iter().zip(&mut self.traffic) {
            for (backend, t) in vip.table.backends().iter().zip(counts.iter_mut()) {
                if t.packets == 0 {
                    continue;
                }
                into.entry(BackendKey {
                    vip: vip.name.clone(),
                    backend: backend.id.0,
                })
                .or_default()
                .add(*t);
                *t = Traffic::default();
            }
        }
    }
}

fn run(
    id: usize,
    mut receiver: Box<dyn Receiver>,
    mut transmitter: Box<dyn Transmitter>,
    mut state: WorkerState,
    shared: &Shared,
    published: &Mutex<WorkerReport>,
) {
    let link = receiver.link();
    let mut out = vec![0u8; OUT_BUFFER].into_boxed_slice();
    let mut by_slot = TrafficBySlot::new(shared.snapshot.load_full());
    let mut local = WorkerReport::default();
    let mut pending_backends: HashMap<BackendKey, Traffic> = HashMap::new();
    let mut last_report = Instant::now();
    tracing::debug!(worker = id, ?link, "worker started");
    loop {
        let stopping = shared.shutdown.load(Ordering::Relaxed);
        // One snapshot per batch: a new one is adopted only here, between batches.
        {
            let current = shared.snapshot.load();
            if !Arc::ptr_eq(&current, &by_slot.snapshot) {
                by_slot.drain_into(&mut pending_backends);
                by_slot = TrafficBySlot::new(arc_swap::Guard::into_inner(current));
            }
        }
        let snapshot = Arc::clone(&by_slot.snapshot);
        let now = monotonic_ns();
        let mut queue_errors = 0u64;
        let received = if stopping {
            Ok(0)
        } else {
            receiver.receive(BATCH_FRAMES, POLL_TIMEOUT, &mut |frame| {
                match forward::process(frame, link, &snapshot, &mut state, now, &mut out) {
                    Action::Encap {
                        vip,
                        backend,
                        to,
                        len,
                    } => {
                        by_slot.count(vip, backend, frame.len());
                        if let Some(packet) = out.get(..len)
                            && transmitter.queue(packet, to).is_err()
                        {
                            queue_errors += 1;
                        }
                    }
                    Action::SnatReturn { to, len } => {
                        if let Some(packet) = out.get(..len)
                            && transmitter.queue(packet, to).is_err()
                        {
                            queue_errors += 1;
                        }
                    }
                    Action::IcmpReply { len } => {
                        if let Some(packet) = out.get(..len)
                            && let Some(client) = ip_destination(packet)
                            && transmitter.queue(packet, client).is_err()
                        {
                            queue_errors += 1;
                        }
                    }
                    // The kernel got its own copy of the frame (AF_PACKET taps, it does not
                    // steal): passing is doing nothing, and so is dropping.
                    Action::Pass | Action::Drop(_) => {}
                }
            })
        };
        match received {
            Ok(n) if n > 0 => {
                local.batches += 1;
                local.largest_batch = local.largest_batch.max(n as u64);
            }
            Ok(_) => {}
            Err(e) => {
                local.device_errors += 1;
                if local.device_errors.is_power_of_two() {
                    tracing::warn!(worker = id, error = %e, count = local.device_errors, "receive failed");
                }
                if !stopping {
                    thread::sleep(POLL_TIMEOUT);
                }
            }
        }
        local.send_failed += queue_errors;
        if transmitter.queued() > 0 {
            match transmitter.flush() {
                Ok(r) => {
                    local.sent += r.sent;
                    local.send_failed += r.failed;
                }
                Err(e) => {
                    local.device_errors += 1;
                    if local.device_errors.is_power_of_two() {
                        tracing::warn!(worker = id, error = %e, count = local.device_errors, "transmit failed");
                    }
                }
            }
        }
        local.generation = snapshot.generation;
        local.heartbeat = Some(Instant::now());
        if stopping || last_report.elapsed() >= REPORT_INTERVAL {
            local.kernel_drops = receiver.kernel_drops();
            local.counters = state.counters;
            local.conntrack = state.conntrack.counters();
            local.occupancy = Some(state.conntrack.occupancy());
            by_slot.drain_into(&mut pending_backends);
            publish(&local, &mut pending_backends, published, stopping);
            last_report = Instant::now();
        }
        if stopping {
            tracing::debug!(worker = id, "worker stopped");
            return;
        }
    }
}

/// Copies `local` into the published report, without waiting unless `wait` (the last report).
fn publish(
    local: &WorkerReport,
    pending_backends: &mut HashMap<BackendKey, Traffic>,
    published: &Mutex<WorkerReport>,
    wait: bool,
) {
    let guard = if wait {
        Some(
            published
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    } else {
        published.try_lock().ok()
    };
    let Some(mut report) = guard else {
        return;
    };
    let mut backends = std::mem::take(&mut report.backends);
    for (key, t) in pending_backends.drain() {
        backends.entry(key).or_default().add(t);
    }
    *report = WorkerReport {
        backends,
        ..local.clone()
    };
}
