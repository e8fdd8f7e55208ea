//! `lb-healthcheck`: the health-check sidecar (`lb healthcheck`).
//!
//! **Status: empty.** The crate exists so that the workspace has its final shape; it holds no
//! code yet. It will hold a mio event loop running many TCP/HTTP/UDP probes with rise/fall
//! dampening, pushing backend health to the muxes' control sockets, and announcing or
//! withdrawing the node's VIPs by BGP (ExaBGP process API, or BIRD via `birdc`) according to the
//! node's own health.
