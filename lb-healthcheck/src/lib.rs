//! `lb-healthcheck`: the health-check sidecar (`lb healthcheck`).
//!
//! It probes the backends and their agents, pushes health to the muxes' control sockets, and
//! announces or withdraws the node's VIPs through a BGP speaker (ExaBGP or BIRD).
//!
//! Modules, each with its invariant:
//! - [`check`]: the check model (TCP / HTTP / UDP, interval, timeout, rise, fall, jitter) with
//!   serde and validation. A check that validates can be run as it is: timeout below interval,
//!   interval ≥ 100 ms, rise and fall ≥ 1, nothing on the wire that breaks framing; problems name
//!   the field as a path.
//! - [`damper`]: rise/fall dampening as a pure state machine. The state changes only after
//!   `fall` consecutive failures or `rise` consecutive successes, so a flapping result stream
//!   never flaps the state.
//! - [`engine`]: one mio event loop on one thread running every probe (no thread per probe),
//!   with a heap of deadlines as its timers, deterministic per-probe jitter, and deduplication
//!   of identical probes, each feeding the dampers of every (VIP, backend) that uses it. Every
//!   started attempt yields exactly one result, and holds at most one socket.
//! - [`sidecar`]: `lb healthcheck`: the engine loop, one publisher per mux (full state on
//!   every new connection), the BGP decision and speakers, status and metrics.

#![forbid(unsafe_code)]

/// The check model; it lives in `lb_core` because the config file (`[vip.check]`) holds it.
pub use lb_core::check;
pub mod damper;
pub mod engine;
pub mod sidecar;

pub use check::{CheckConfig, CheckKind};
pub use damper::{HealthState, Transition};
pub use engine::{
    Engine, EngineOptions, HealthEvent, ProbeError, ProbeId, ProbeResult, ProbeSpec, Round,
    TargetId,
};
