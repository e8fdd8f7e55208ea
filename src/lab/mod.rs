//! The fleet lab's building blocks that run inside its namespaces.
//!
//! - [`server`]: the backend's real servers (HTTP/1.1 keep-alive and UDP echo), with counters.
//! - [`traffic`]: the client side: long-lived TCP connections and a sequenced UDP stream that
//!   count broken connections and lost datagrams.
//!
//! Invariant: everything here only uses sockets of the current network namespace (the caller
//! enters one first) and is bounded in count and time.

pub mod server;
pub mod traffic;
