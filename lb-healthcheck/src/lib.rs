//! `lb-healthcheck`: the health-check sidecar (`lb healthcheck`).
//!
//! The crate holds the engine of the sidecar; pushing health to the muxes' control sockets and
//! driving BGP come next (issue 6).
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

#![forbid(unsafe_code)]

pub mod check;
pub mod damper;
pub mod engine;

pub use check::{CheckConfig, CheckKind};
pub use damper::{HealthState, Transition};
pub use engine::{
    Engine, EngineOptions, HealthEvent, ProbeError, ProbeId, ProbeResult, ProbeSpec, Round,
    TargetId,
};
