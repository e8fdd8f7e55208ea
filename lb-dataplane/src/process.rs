//! What the long-running `lb` processes (`lb mux`, `lb agent`, `lb healthcheck`) share: their
//! command-line options, and signal handling for the ones that poll (agent and sidecar).
//!
//! Invariant: SIGTERM and SIGINT stop a process once (the first one counts; the process then
//! finishes its work in hand and exits 0), and SIGHUP only ever requests a reload; no signal
//! handler does anything but set a flag (signal-hook's iterator runs on its own thread).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// How a long-running `lb` process was started.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The config file.
    pub config: PathBuf,
    /// Overrides the config's control socket.
    pub control_socket: Option<PathBuf>,
    /// Overrides the config's metrics address.
    pub metrics_address: Option<SocketAddr>,
    /// Do not start the metrics exporter.
    pub no_metrics: bool,
}

/// Starts the thread that sets `reload_requested` on SIGHUP and calls `stop` on the first
/// SIGTERM or SIGINT.
pub fn handle_signals(
    reload_requested: Arc<AtomicBool>,
    stop: impl FnOnce() + Send + 'static,
) -> Result<(), String> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|e| format!("signal handlers: {e}"))?;
    thread::Builder::new()
        .name("lb-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGHUP {
                    reload_requested.store(true, Ordering::Relaxed);
                    continue;
                }
                tracing::info!(signal, "shutting down");
                stop();
                break;
            }
        })
        .map(drop)
        .map_err(|e| e.to_string())
}
