//! `lb mux`: the node. Loads the config, starts one worker per receive queue, serves the control
//! socket and the metrics, and reacts to signals and file changes.
//!
//! - **Devices** (`node.io`). AF_XDP ([`crate::xdp`]): each worker gets the AF_XDP socket of one
//!   receive queue of `node.interface` (the NIC's RSS keeps a flow on one queue, so its conntrack
//!   entry is where its packets are) and sends from AF_XDP sockets too. AF_PACKET: each worker
//!   gets its own TPACKET_V3 ring on `node.interface`, all in one `PACKET_FANOUT_HASH` group
//!   (same property), and its own raw IP sockets to send with `sendmmsg`. `auto` tries AF_XDP
//!   first.
//! - **Reload** on SIGHUP, on a change of the config file's contents once the file is complete
//!   ([`crate::watch`], polled every [`crate::watch::TICK`]), and on the control socket's
//!   `reload`. Reloads run on the node's own thread ([`crate::node`]): a long compile never
//!   delays SIGTERM, and `status` answers meanwhile. See [`crate::control`].
//! - **Shutdown** on SIGTERM or SIGINT: workers finish their batch, flush and stop; the control
//!   socket file is removed; the process exits 0.
//!
//! **Invariant.** Settings that shape the process (interface, workers, conntrack size, control
//! socket, metrics address) are read at start only; a reload that changes them logs that they
//! take effect on restart, and applies the rest.

use std::io;
use std::sync::Arc;

use crate::process::RunOptions;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::afpacket::{AfPacketReceiver, RingConfig};
use crate::control::{ControlPlane, IoStatus};
use crate::device::{Receiver, Transmitter};
use crate::node::{Devices, Mux, worker_count};
use crate::rawip::RawIpTransmitter;
use crate::xdp::Steering;
use lb_core::config::IoMode;

/// Packets a worker's transmitter queues before it must flush.
pub(crate) const TX_QUEUE: usize = 256;

/// Opens `count` AF_PACKET receivers on `interface` in one fanout group, each with its own
/// raw-socket transmitter.
pub fn open_af_packet(interface: &str, count: usize) -> io::Result<Vec<Devices>> {
    // One group per process: two muxes in one namespace must not share a group.
    let group = (std::process::id() & 0xffff) as u16;
    let fanout = (count > 1).then_some(group);
    (0..count)
        .map(|_| {
            let rx = AfPacketReceiver::open(interface, fanout, RingConfig::default())?;
            let tx = RawIpTransmitter::open(TX_QUEUE)?;
            Ok((
                Box::new(rx) as Box<dyn Receiver>,
                Box::new(tx) as Box<dyn Transmitter>,
            ))
        })
        .collect()
}

/// Opens the workers' devices as `io` asks: AF_XDP (with the steering it needs kept alive, and
/// installed as the plane's publish hook), or AF_PACKET; `auto` tries AF_XDP first and logs
/// why it fell back. Records the mode in force on the plane.
fn open_devices(
    plane: &Arc<ControlPlane>,
    interface: &str,
    workers: usize,
    io: IoMode,
) -> Result<(Vec<Devices>, Option<Arc<Steering>>), String> {
    let mut fallbacks = Vec::new();
    if io != IoMode::AfPacket {
        let snapshot = plane.shared().snapshot.load_full();
        match crate::xdp::open(interface, workers, &snapshot) {
            Ok((devices, steering, mode)) => {
                if devices.len() < workers {
                    tracing::warn!(
                        %interface,
                        asked = workers,
                        queues = mode.queues,
                        "AF_XDP needs one receive queue per worker: starting {} worker(s)",
                        devices.len()
                    );
                }
                for why in &mode.fallbacks {
                    tracing::warn!(%interface, reason = %why, "AF_XDP fallback");
                }
                let steering = Arc::new(steering);
                plane.set_publish_hook(Arc::clone(&steering) as Arc<dyn crate::control::PublishHook>);
                // A reload may have published between opening and installing the hook.
                steering.before_publish(&plane.shared().snapshot.load());
                steering.after_publish(&plane.shared().snapshot.load());
                plane.set_io(IoStatus {
                    mode: "af_xdp".into(),
                    attach: Some(mode.attach.as_str().into()),
                    bind: Some(mode.bind.as_str().into()),
                    queues: Some(mode.queues),
                    fallbacks: mode.fallbacks,
                });
                let devices = devices
                    .into_iter()
                    .map(|(rx, tx)| {
                        (
                            Box::new(rx) as Box<dyn Receiver>,
                            Box::new(tx) as Box<dyn Transmitter>,
                        )
                    })
                    .collect();
                return Ok((devices, Some(steering)));
            }
            Err(e) if io == IoMode::Auto => {
                tracing::warn!(%interface, error = %e, "AF_XDP is not available; using AF_PACKET");
                fallbacks.push(format!("AF_XDP: {e}"));
            }
            Err(e) => return Err(format!("node.io = \"af_xdp\": {e}")),
        }
    }
    let devices = open_af_packet(interface, workers)
        .map_err(|e| format!("opening {workers} worker device(s) on {interface}: {e}"))?;
    plane.set_io(IoStatus {
        mode: "af_packet".into(),
        fallbacks,
        ..IoStatus::default()
    });
    Ok((devices, None))
}

/// Runs `lb mux` until SIGTERM or SIGINT. Errors are for the operator, naming what failed.
pub fn run(options: &RunOptions) -> Result<(), String> {
    let (plane, _) = ControlPlane::start(&options.config)?;
    let config = plane.config();
    config
        .check_role(lb_core::config::Role::Mux, &options.config)
        .map_err(|e| e.to_string())?;
    let interface = config.node.interface.clone().unwrap_or_default();
    let workers = worker_count(&config);
    let (devices, steering) = open_devices(&plane, &interface, workers, config.node.io)?;
    let workers = devices.len();
    let socket_path = options
        .control_socket
        .clone()
        .unwrap_or_else(|| config.node.control_socket_path());
    let signals = Signals::new([SIGHUP, SIGTERM, SIGINT])
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    let mux = Mux::start(Arc::clone(&plane), devices, &socket_path).map_err(|e| e.to_string())?;
    if !options.no_metrics {
        let address = options
            .metrics_address
            .unwrap_or(config.node.metrics_address);
        if let Err(e) = crate::exporter::start(Arc::clone(&plane), address) {
            mux.stop();
            return Err(e);
        }
    }
    tracing::info!(
        node = %config.node.name,
        %interface,
        workers,
        socket = %socket_path.display(),
        "lb mux running"
    );
    let mut signals = signals;
    let handle = signals.handle();
    for signal in signals.forever() {
        if signal == SIGHUP {
            mux.request_reload();
            continue;
        }
        tracing::info!(signal, "shutting down");
        break;
    }
    handle.close();
    mux.stop();
    // Detaches the steering program only now: the workers' sockets are closed.
    drop(steering);
    tracing::info!("lb mux stopped");
    Ok(())
}
