//! `lb-dataplane`: packet I/O and the processes built on it, `lb mux` (and later `lb agent`).
//!
//! - [`device`]: the [`device::Receiver`] / [`device::Transmitter`] traits the worker loop runs on.
//! - [`afpacket`]: AF_PACKET TPACKET_V3 receive rings with `PACKET_FANOUT_HASH`.
//! - [`rawip`]: batched transmission of IP packets on raw sockets (`sendmmsg`); the kernel's
//!   routing and neighbour tables find the next hop.
//! - [`memory`]: an in-memory device, so the whole worker loop runs under `cargo test` without
//!   root.
//!
//! Invariant to keep: nothing on the per-packet path allocates, locks or makes a syscall per
//! packet.

pub mod afpacket;
pub mod control;
pub mod device;
pub mod exporter;
pub mod memory;
pub mod mux;
pub mod node;
pub mod rawip;
pub mod socket;
pub mod worker;
