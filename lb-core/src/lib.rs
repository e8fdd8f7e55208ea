//! `lb-core`: the pure logic of the load balancer. No I/O, no threads, no clocks.
//!
//! Everything here is a deterministic function of its inputs, so that every mux of a fleet
//! computes the same answer from the same configuration:
//!
//! - [`hash`]: the fixed xxh3 seeds and the multiply-shift range reduction every table uses.
//! - [`flow`]: [`FlowKey`], the 5-tuple of a packet, and its fleet-stable hash.
//! - [`maglev`]: weighted Maglev lookup tables (NSDI 2016 §3.4), their fingerprint and diff.
//! - [`config`]: the TOML configuration model and its validation.
//!
//! Later layers (the packet path, connection tracking, encapsulation, SNAT ranges) join these
//! modules; the I/O that drives them lives in `lb-dataplane`.
#![forbid(unsafe_code)]

pub mod config;
pub mod flow;
pub mod hash;
pub mod maglev;

pub use flow::FlowKey;
pub use maglev::{BackendId, MaglevBuilder, MaglevTable, TableDiff};
