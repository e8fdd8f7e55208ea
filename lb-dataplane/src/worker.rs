//! The mux worker loop: receive a batch, copy its frames into the worker's batch arena, decide
//! them together with [`lb_core::forward::process_batch`], queue what is sent, flush, repeat.
//!
//! Each worker owns its [`WorkerState`] (connection table, counters) and its devices; the only
//! thing shared on the hot path is the read-only [`Snapshot`], loaded from the [`Shared`]
//! arc-swap once per batch, so every packet of a batch sees one config. Conntrack lives in the
//! worker, so it survives reloads; a flow whose backend left the table falls back to the table
//! (`forward` checks that with the backend's tag).
//!
//! A received frame is valid only during its [`Receiver::receive`] callback, so the callback
//! copies it into a slot of the worker's batch arena ([`FRAME_SLOT`] bytes each, [`BATCH_FRAMES`]
//! slots); the arena is decided and queued when `receive` returns. A frame longer than a slot is
//! decided alone with [`forward::process`] in the callback, right after the frames pending in
//! the arena are decided and queued, so transmissions stay in arrival order.
//!
//! **Invariants.**
//! - Per packet: no allocation, no lock, no syscall. Per batch: one snapshot load, a few clock
//!   reads (vDSO, no syscall), one flush (one `sendmmsg` per address family, plus one more after
//!   a refused packet), a `poll` when idle. The arenas
//!   are allocated once per worker; the per-batch slice views are arrays on the stack.
//! - Transmissions are queued in arrival order (Encap to its backend, SNAT return to the port's
//!   owner, ICMP reply to its client), whatever mix of arena and long frames a batch holds:
//!   order within a flow is kept.
//! - Every output buffer fits the largest output of its input: an arena output slot
//!   ([`OUT_SLOT`]) holds a [`FRAME_SLOT`]-byte packet encapsulated with
//!   [`lb_core::encap::MAX_OVERHEAD`] and the largest ICMP "too big" reply (1280 bytes), the
//!   long-frame buffer a 64 KiB packet encapsulated. An undersized buffer would be an
//!   `Action::Drop(Internal)`; none can come from here (checked at compile time).
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
use lb_core::encap::MAX_OVERHEAD;
use lb_core::forward::{self, Action, Counters, WorkerState};
use lb_core::packet::Link;
use lb_core::snapshot::Snapshot;

use crate::device::{Receiver, Transmitter, ip_destination};

/// Most frames a worker takes in one batch.
pub const BATCH_FRAMES: usize = 64;
/// How long an idle worker waits for frames before it looks at the shutdown flag again.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// How often a worker publishes its [`WorkerReport`].
pub const REPORT_INTERVAL: Duration = Duration::from_millis(100);
/// Output buffer size for a frame longer than [`FRAME_SLOT`]: the largest IP packet plus the
/// largest encapsulation overhead.
const OUT_BUFFER: usize = 65_535 + MAX_OVERHEAD;
/// Bytes of a slot of the batch arena: frames up to this length are decided in batches.
pub const FRAME_SLOT: usize = 2048;
/// The largest ICMP "too big" reply `forward` writes: IPv6 packet too big, quoting up to 1280
/// bytes in all (IPv4's "fragmentation needed" stops at 576).
const ICMP_REPLY_MAX: usize = 1280;
/// Bytes of an output slot of the batch arena: a [`FRAME_SLOT`] frame encapsulated, or a reply.
pub const OUT_SLOT: usize = max(FRAME_SLOT + MAX_OVERHEAD, ICMP_REPLY_MAX);
const _: () = assert!(OUT_SLOT >= FRAME_SLOT + MAX_OVERHEAD && OUT_SLOT >= ICMP_REPLY_MAX);
const _: () = assert!(OUT_BUFFER >= FRAME_SLOT + MAX_OVERHEAD && OUT_BUFFER >= ICMP_REPLY_MAX);

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

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
    /// Packets the transmitter handed to the kernel's own path (AF_XDP: next hop unresolved).
    pub tx_slow_path: u64,
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

/// Where decided frames go: queued on the transmitter, counted per backend.
struct Sink<'a> {
    transmitter: &'a mut dyn Transmitter,
    by_slot: &'a mut TrafficBySlot,
    queue_errors: &'a mut u64,
}

impl Sink<'_> {
    /// Queues what `action` sends: the first bytes of `out`, for a frame of `frame_len` bytes.
    #[inline]
    fn send(&mut self, action: Action, frame_len: usize, out: &[u8]) {
        match action {
            Action::Encap {
                vip,
                backend,
                to,
                len,
            } => {
                self.by_slot.count(vip, backend, frame_len);
                if let Some(packet) = out.get(..len)
                    && self.transmitter.queue(packet, to).is_err()
                {
                    *self.queue_errors += 1;
                }
            }
            Action::SnatReturn { to, len } => {
                if let Some(packet) = out.get(..len)
                    && self.transmitter.queue(packet, to).is_err()
                {
                    *self.queue_errors += 1;
                }
            }
            Action::IcmpReply { len } => {
                if let Some(packet) = out.get(..len)
                    && let Some(client) = ip_destination(packet)
                    && self.transmitter.queue(packet, client).is_err()
                {
                    *self.queue_errors += 1;
                }
            }
            // The kernel got its own copy of the frame (AF_PACKET taps, it does not steal):
            // passing is doing nothing, and so is dropping.
            Action::Pass | Action::Drop(_) => {}
        }
    }
}

/// The worker's batch arena: copies of the frames received and not yet decided, and the
/// outputs of their decision. Allocated once; nothing is allocated per batch.
struct Batch {
    /// [`BATCH_FRAMES`] slots of [`FRAME_SLOT`] bytes.
    frames: Box<[u8]>,
    /// The length of the frame in each slot.
    lens: [usize; BATCH_FRAMES],
    /// Slots in use, from the first.
    pending: usize,
    /// [`BATCH_FRAMES`] slots of [`OUT_SLOT`] bytes.
    outs: Box<[u8]>,
    actions: [Action; BATCH_FRAMES],
}

impl Batch {
    fn new() -> Self {
        Self {
            frames: vec![0u8; BATCH_FRAMES * FRAME_SLOT].into_boxed_slice(),
            lens: [0; BATCH_FRAMES],
            pending: 0,
            outs: vec![0u8; BATCH_FRAMES * OUT_SLOT].into_boxed_slice(),
            actions: [Action::Pass; BATCH_FRAMES],
        }
    }

    /// Copies `frame` into the next slot; false if it is longer than a slot or all are taken.
    #[inline]
    fn push(&mut self, frame: &[u8]) -> bool {
        if frame.len() > FRAME_SLOT || self.pending == BATCH_FRAMES {
            return false;
        }
        let start = self.pending * FRAME_SLOT;
        self.frames[start..start + frame.len()].copy_from_slice(frame);
        self.lens[self.pending] = frame.len();
        self.pending += 1;
        true
    }

    /// Decides the pending frames with [`forward::process_batch`] and sends what they give, in
    /// order; the arena is then empty.
    fn decide(
        &mut self,
        link: Link,
        snapshot: &Snapshot,
        state: &mut WorkerState,
        now: u64,
        sink: &mut Sink<'_>,
    ) {
        let n = std::mem::take(&mut self.pending);
        if n == 0 {
            return;
        }
        let (frames, lens) = (&self.frames, &self.lens);
        let views: [&[u8]; BATCH_FRAMES] =
            std::array::from_fn(|i| &frames[i * FRAME_SLOT..][..lens[i]]);
        let mut slots = self.outs.chunks_exact_mut(OUT_SLOT);
        let mut outs: [&mut [u8]; BATCH_FRAMES] =
            std::array::from_fn(|_| slots.next().unwrap_or_default());
        let decided = forward::process_batch(
            &views[..n],
            link,
            snapshot,
            state,
            now,
            &mut outs[..n],
            &mut self.actions[..n],
        );
        debug_assert_eq!(decided, n);
        for ((&action, &len), out) in self.actions[..decided].iter().zip(lens).zip(&outs) {
            sink.send(action, len, out);
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
    let mut batch = Batch::new();
    let mut by_slot = TrafficBySlot::new(shared.snapshot.load_full());
    let mut local = WorkerReport::default();
    let mut pending_backends: HashMap<BackendKey, Traffic> = HashMap::new();
    let mut last_report = Instant::now();
    tracing::debug!(worker = id, ?link, "worker started");
    loop {
        let stopping = shared.shutdown.load(Ordering::Relaxed);
        // One snapshot per batch, adopted between batches: here, and again when the batch's
        // first frame is handed over (the wait for it may be long): a change published
        // meanwhile, such as a drain, applies to every batch handed over after it.
        let mut snapshot = adopt(shared, &mut by_slot, &mut pending_backends);
        let mut now = monotonic_ns();
        let mut first_frame = true;
        let mut queue_errors = 0u64;
        let mut sink = Sink {
            transmitter: &mut *transmitter,
            by_slot: &mut by_slot,
            queue_errors: &mut queue_errors,
        };
        let received = if stopping {
            Ok(0)
        } else {
            receiver.receive(BATCH_FRAMES, POLL_TIMEOUT, &mut |frame| {
                if first_frame {
                    first_frame = false;
                    snapshot = adopt(shared, sink.by_slot, &mut pending_backends);
                    now = monotonic_ns();
                }
                if batch.push(frame) {
                    return;
                }
                // Too long for a slot (or, against the device's contract, one frame too many):
                // what is pending goes first, then this frame alone.
                batch.decide(link, &snapshot, &mut state, now, &mut sink);
                if batch.push(frame) {
                    return;
                }
                let action = forward::process(frame, link, &snapshot, &mut state, now, &mut out);
                sink.send(action, frame.len(), &out);
            })
        };
        batch.decide(link, &snapshot, &mut state, now, &mut sink);
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
            local.tx_slow_path = transmitter.slow_path();
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

/// The newest published snapshot, adopted if it changed (the old one's per-backend counts
/// are kept in `pending`). Called only between batches: one snapshot load, no allocation
/// unless the snapshot changed.
fn adopt(
    shared: &Shared,
    by_slot: &mut TrafficBySlot,
    pending: &mut HashMap<BackendKey, Traffic>,
) -> Arc<Snapshot> {
    let current = shared.snapshot.load();
    if !Arc::ptr_eq(&current, &by_slot.snapshot) {
        by_slot.drain_into(pending);
        *by_slot = TrafficBySlot::new(arc_swap::Guard::into_inner(current));
    }
    Arc::clone(&by_slot.snapshot)
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
