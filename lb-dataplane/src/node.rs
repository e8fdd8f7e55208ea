//! A running mux node: workers on their devices, the control plane and the control socket,
//! whatever the devices are (AF_PACKET in `lb mux`, in-memory in tests).
//!
//! Reloads run on the node's own thread (`lb-reload`): on request ([`Mux::request_reload`],
//! SIGHUP in `lb mux`) and when the watched config file has new, complete contents
//! ([`crate::watch`]). A long compile there never delays a signal, and `status` answers
//! meanwhile.
//!
//! **Invariant.** [`Mux::stop`] returns only after every worker finished its batch, flushed its
//! transmitter and published its last report. It does not wait for a reload in progress: that
//! thread ends at its next step, or with the process.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;

use lb_core::config::Config;
use lb_core::conntrack::ConnTableConfig;

use crate::control::ControlPlane;
use crate::device::{Receiver, Transmitter};
use crate::socket::ControlSocket;
use crate::watch::{Change, ConfigWatch};
use crate::worker::{self, WorkerHandle};

/// A worker's pair of devices.
pub type Devices = (Box<dyn Receiver>, Box<dyn Transmitter>);

/// A running mux: workers, control socket and reload thread.
#[derive(Debug)]
pub struct Mux {
    plane: Arc<ControlPlane>,
    workers: Vec<WorkerHandle>,
    socket: ControlSocket,
    /// Explicit reload requests to the reload thread; dropping it ends the thread.
    reloads: crossbeam_channel::Sender<()>,
}

/// Reloads on request and when the watched file has new, complete contents, until the
/// requests' sender is dropped.
fn reload_loop(plane: &ControlPlane, requests: &crossbeam_channel::Receiver<()>) {
    use crossbeam_channel::RecvTimeoutError;
    let mut watch = ConfigWatch::new(plane.config_path(), plane.file_digest());
    loop {
        match requests.recv_timeout(crate::watch::TICK) {
            Ok(()) => {
                let _ = plane.reload("SIGHUP");
            }
            Err(RecvTimeoutError::Timeout) => match watch.poll() {
                Some(Change::Ready(bytes, digest)) => {
                    let _ = plane.reload_watched(bytes, digest);
                }
                Some(Change::Unreadable(reason)) => {
                    tracing::warn!(file = %plane.config_path().display(), %reason, "config file unreadable; the config in force keeps serving");
                }
                None => {}
            },
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// The worker count a config asks for: `node.workers`, or one per core.
#[must_use]
pub fn worker_count(config: &Config) -> usize {
    match config.node.workers {
        0 => thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => usize::from(n),
    }
}

/// The connection-table size a config asks for, per worker.
#[must_use]
pub fn conntrack_config(config: &Config) -> ConnTableConfig {
    ConnTableConfig {
        capacity: config.node.conntrack_capacity as usize,
        ..ConnTableConfig::default()
    }
}

impl Mux {
    /// Starts one worker per device pair and the control socket at `socket_path`.
    pub fn start(
        plane: Arc<ControlPlane>,
        devices: Vec<Devices>,
        socket_path: &Path,
    ) -> io::Result<Self> {
        let conntrack = conntrack_config(&plane.config());
        let socket = ControlSocket::serve(
            Arc::clone(&plane) as Arc<dyn crate::socket::ControlHandler>,
            socket_path,
        )?;
        let mut workers: Vec<WorkerHandle> = Vec::with_capacity(devices.len());
        for (id, (rx, tx)) in devices.into_iter().enumerate() {
            match worker::spawn(id, rx, tx, conntrack, Arc::clone(plane.shared())) {
                Ok(handle) => {
                    plane.add_worker(Arc::clone(&handle.report));
                    workers.push(handle);
                }
                Err(e) => {
                    // Leave nothing running: stop the workers already started.
                    plane.shared().shutdown.store(true, Ordering::Relaxed);
                    for w in workers {
                        w.join();
                    }
                    return Err(e);
                }
            }
        }
        let (reloads, requests) = crossbeam_channel::unbounded();
        let reloader = {
            let plane = Arc::clone(&plane);
            thread::Builder::new()
                .name("lb-reload".into())
                .spawn(move || reload_loop(&plane, &requests))
        };
        let mux = Self {
            plane,
            workers,
            socket,
            reloads,
        };
        if let Err(e) = reloader {
            mux.stop();
            return Err(e);
        }
        Ok(mux)
    }

    /// Asks the reload thread to read the config file again (SIGHUP): applied even if the file
    /// watcher would hold it.
    pub fn request_reload(&self) {
        let _ = self.reloads.send(());
    }

    /// The control plane.
    #[must_use]
    pub fn plane(&self) -> &Arc<ControlPlane> {
        &self.plane
    }

    /// The control socket's path.
    #[must_use]
    pub fn socket_path(&self) -> &Path {
        self.socket.path()
    }

    /// Stops the workers (each finishes its batch and flushes) and removes the control socket.
    pub fn stop(self) {
        self.plane.shared().shutdown.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.join();
        }
        drop(self.socket);
    }
}
