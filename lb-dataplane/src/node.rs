//! A running mux node: workers on their devices, the control plane and the control socket,
//! whatever the devices are (AF_PACKET in `lb mux`, in-memory in tests).
//!
//! **Invariant.** [`Mux::stop`] returns only after every worker finished its batch, flushed its
//! transmitter and published its last report.

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
use crate::worker::{self, WorkerHandle};

/// A worker's pair of devices.
pub type Devices = (Box<dyn Receiver>, Box<dyn Transmitter>);

/// A running mux: workers and control socket.
#[derive(Debug)]
pub struct Mux {
    plane: Arc<ControlPlane>,
    workers: Vec<WorkerHandle>,
    socket: ControlSocket,
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
        Ok(Self {
            plane,
            workers,
            socket,
        })
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
