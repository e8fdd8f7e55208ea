//! `lb-dataplane`: packet I/O and the processes built on it, `lb mux` and `lb agent`.
//!
//! - [`device`]: the [`device::Receiver`] / [`device::Transmitter`] traits the worker loop runs on.
//! - [`afpacket`]: AF_PACKET TPACKET_V3 receive rings with `PACKET_FANOUT_HASH`.
//! - [`rawip`]: batched transmission of IP packets on raw sockets (`sendmmsg`); the kernel's
//!   routing and neighbour tables find the next hop.
//! - [`xdp`]: AF_XDP sockets, the XDP program that steers VIP frames into them, next hops.
//! - [`tun`]: a TUN device (`IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`) where the agent injects
//!   decapsulated packets; [`vnet`]: its virtio-net header, checksums, GSO segmentation of what
//!   the agent reads; [`coalesce`]: the TCP segments of a batch merged into one write (GRO).
//! - [`sockdiag`]: `NETLINK_SOCK_DIAG` lookups of one TCP 4-tuple (does this host have it?).
//! - [`memory`]: an in-memory device, so the whole worker loop runs under `cargo test` without
//!   root.
//! - [`worker`]: the worker loop: a batch in, [`lb_core::forward::process_batch`] on it, a flush
//!   out; one snapshot per batch.
//! - [`control`]: the config in force, health and drain overrides, reloads, `status`.
//! - [`socket`]: the control socket (Unix, 0600, line-delimited JSON) and its client.
//! - [`exporter`]: the Prometheus metrics.
//! - [`health_endpoint`]: `GET /healthz` over HTTP, the agent's health for the muxes' sidecars.
//! - [`process`]: what the long-running processes share: options and signal handling.
//! - [`node`]: a running node (workers + control socket) on any devices; [`mux`]: `lb mux` on
//!   AF_PACKET, with signals and the config-file watcher.
//! - [`agent`]: the backend agent's decision (accept only muxes, the VIP check, daisy chaining);
//!   [`agent_run`]: `lb agent` (TUN delivery, chaining, egress SNAT, status, metrics);
//!   [`chain_guard`]: the bounds on what daisy chaining may cost (answer caches, budgets);
//!   [`egress`]: egress SNAT's policy routing, TUN packet triage and fast refusals.
//!
//! Invariant to keep: nothing on the mux's per-packet path allocates, locks or makes a syscall
//! per packet. (The agent writes into a TUN once per coalesced item, at the end of each batch:
//! see [`tun`] and [`coalesce`].)

pub mod afpacket;
pub mod agent;
pub mod agent_run;
pub mod chain_guard;
pub mod coalesce;
pub mod control;
pub mod device;
pub mod egress;
pub mod exporter;
pub mod health_endpoint;
pub mod memory;
pub mod mux;
pub mod node;
pub mod process;
pub mod rawip;
pub mod sockdiag;
pub mod socket;
pub mod tun;
pub mod vnet;
pub mod watch;
pub mod worker;
pub mod xdp;
