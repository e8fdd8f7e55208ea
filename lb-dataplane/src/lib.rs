//! `lb-dataplane`: packet I/O and the processes built on it: `lb mux` and `lb agent`.
//!
//! **Status: empty.** The crate exists so that the workspace has its final shape; it holds no
//! code yet. Its contents arrive with the issues that build them, on top of `lb-core`:
//! - a packet-device trait with AF_PACKET (TPACKET_V3 rings, `PACKET_FANOUT_HASH`), TUN, raw
//!   socket and in-memory implementations;
//! - worker threads that each own their connection table and counters, reading the config
//!   `Snapshot` once per batch (arc-swap), so a packet sees one config, never a mix;
//! - the control socket (Unix, line-delimited JSON) and the Prometheus metrics exporter.
//!
//! Invariant to keep: nothing on the per-packet path allocates, locks or makes a syscall per
//! packet.
