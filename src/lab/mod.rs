//! The fleet lab (`lb lab ...`): a whole fleet in network namespaces on this machine, real
//! traffic through it, and the resilience experiments.
//!
//! - [`live`]: builds, records and removes the fleet (`lb lab up|down|status`).
//! - [`server`]: the backends' real servers (HTTP/1.1 keep-alive and UDP echo), with counters.
//! - [`traffic`]: the client side: long-lived TCP connections and a sequenced UDP stream that
//!   count broken connections and lost datagrams.
//! - [`experiment`]: the experiments (a mux dies, a backend is added, ...) and their figures.
//! - [`demo`]: `lb lab demo` and `lb lab experiment`: a temporary lab, live traffic, the
//!   experiments, the results table.
//!
//! Invariant: the lab only touches its own namespaces (198.18.0.0/15 inside them) and the
//! processes it started; traffic is bounded in count and time.

pub mod demo;
pub mod experiment;
pub mod live;
pub mod server;
pub mod traffic;
