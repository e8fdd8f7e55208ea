//! The `lb` command-line tool's commands, as a library so that benches and tests share them.
//!
//! - [`table`]: `lb table` and `lb table diff`, the operator's view of Maglev tables.
//! - [`bench`](mod@bench): `lb bench table`, and the deterministic inputs the criterion benches use too.
//! - [`forward_bench`] and [`tcp_bench`]: `lb bench forward` and `lb bench tcp`, packets and TCP
//!   through `lb mux` (and `lb agent`) against the kernel's forwarding, in namespaces.
//! - [`status`]: `lb status` and `lb ctl`: the nodes' control-socket answers for a person.
//! - [`lab`]: the fleet lab (`lb lab`): namespaces, processes, traffic and experiments.
//!
//! Commands write to a caller-given `Write`, never to stdout directly, so output is testable
//! and a closed pipe (`lb table … | head`) ends the command quietly instead of panicking.

pub mod bench;
pub mod bird_lab;
pub mod blast;
pub mod forward_bench;
pub mod lab;
pub mod measure;
pub mod netns;
pub mod status;
pub mod table;
pub mod tcp_bench;
pub mod topology;
