//! `lb-core`: the pure logic of the load balancer. No I/O, no threads, no clocks.
//!
//! Everything here is a deterministic function of its inputs, so that every mux of a fleet
//! computes the same answer from the same configuration:
//!
//! - [`hash`]: the fixed xxh3 seeds and the multiply-shift range reduction every table uses.
//! - [`flow`]: [`FlowKey`], the 5-tuple of a packet, and its fleet-stable hash.
//! - [`maglev`]: weighted Maglev lookup tables (NSDI 2016 §3.4), their fingerprint and diff.
//! - [`config`]: the TOML configuration model and its validation.
//! - [`check`]: the health-check model of a VIP (`[vip.check]`): TCP, HTTP or UDP, and its timing.
//! - [`snapshot`]: a config compiled for the hot path (VIP match, tables, backends).
//! - [`snat`]: egress SNAT (Ananta): the config section, port-range ownership, the agent's NAT table.
//! - [`packet`]: parsing frames into the facts the decision steers by.
//! - [`conntrack`]: the per-worker connection table (fixed capacity, SYN-flood safe).
//! - [`encap`]: IP-in-IP and GRE encapsulation and decapsulation.
//! - [`forward`]: the forwarding decision, `process(frame, &Snapshot, &mut WorkerState)`.
//! - `golden` (cargo feature `golden`): the golden packet table that the decision's tests, the
//!   pipeline benchmark and the fuzz seeds share.
//!
//! The I/O that drives them lives in `lb-dataplane`.
#![forbid(unsafe_code)]

pub mod budget;
pub mod check;
pub mod config;
pub mod conntrack;
pub mod encap;
pub mod flow;
pub mod forward;
#[cfg(any(test, feature = "golden"))]
pub mod golden;
pub mod hash;
pub mod maglev;
pub mod packet;
pub mod snapshot;
pub mod snat;
pub mod time;

pub use flow::FlowKey;
pub use maglev::{BackendId, MaglevBuilder, MaglevTable, TableDiff};
