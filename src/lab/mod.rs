//! The fleet lab's building blocks that run inside its namespaces.
//!
//! - [`server`]: the backend's real servers (HTTP/1.1 keep-alive and UDP echo), with counters.
//!
//! Invariant: everything here only uses sockets of the current network namespace (the caller
//! enters one first) and is bounded in count and time.

pub mod server;
