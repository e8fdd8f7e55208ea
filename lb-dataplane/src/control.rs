//! The control plane of a mux: the config in force, the overrides of the operators and of the
//! health-check sidecar (health, drain), reloads, and the answers of the control socket.
//!
//! Every change goes the same way: take the base config (the file) and the overrides, derive the
//! effective config, validate it, compile a [`Snapshot`] off the hot path, and publish it with
//! one arc-swap store. Workers adopt it at their next batch.
//!
//! **Invariants.**
//! - A change that fails (bad file, unknown backend, table error) publishes nothing: the old
//!   snapshot keeps serving, and the error names the file, field or backend.
//! - Changes are serialized by one lock, held while a snapshot compiles; `status`, `workers`
//!   and metrics never take it: they read the [`View`] published after each change, so they
//!   answer while a large config compiles.
//! - A change seen by the file watcher is applied only once the file is complete
//!   ([`crate::watch`]); one that would remove most VIPs, or leave a VIP that had backends with
//!   none, is held (logged, shown in status) until an explicit `reload` (control socket or
//!   SIGHUP). Every VIP and backend a reload removes is logged at WARN.
//! - The generation grows by one with each published snapshot; `lb status` and metrics show it
//!   with each VIP's table fingerprint.
//! - An unhealthy backend is removed from its VIP's table, so tracked flows to it are no longer
//!   honoured; a drained backend has weight 0, so it gets no new flows but keeps tracked ones.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;

use lb_core::config::Config;
use lb_core::forward::DropReason;
use lb_core::maglev::fingerprint_hex;
use lb_core::snapshot::Snapshot;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::worker::{BackendKey, Shared, Traffic, WorkerReport};

/// A control-socket request: one JSON object per line, `{"command": "...", ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The node's state: generation, fingerprints, backends, counters.
    Status,
    /// Only the workers' liveness (the sidecar asks it several times a second): cheap, and
    /// never waits for a table being rebuilt.
    Workers,
    /// Marks a backend healthy or not (the health-check sidecar). Without `vip`, every VIP that
    /// has the backend.
    SetHealth {
        /// The backend's address.
        backend: IpAddr,
        /// Only this VIP.
        #[serde(default)]
        vip: Option<String>,
        /// Its health.
        healthy: bool,
    },
    /// The health of many (VIP, backend) pairs at once, published as one snapshot: the
    /// sidecar's full state when it (re)connects, and each round of changes. Pairs this mux's
    /// config does not have are ignored and listed in the answer (the sidecar's config may be
    /// a reload ahead or behind).
    SyncHealth {
        /// The pairs and their health.
        backends: Vec<HealthEntry>,
    },
    /// Weight 0 for a backend: no new flows, tracked flows continue.
    Drain {
        /// The backend's address.
        backend: IpAddr,
        /// Only this VIP.
        #[serde(default)]
        vip: Option<String>,
    },
    /// Undoes [`Request::Drain`].
    Undrain {
        /// The backend's address.
        backend: IpAddr,
        /// Only this VIP.
        #[serde(default)]
        vip: Option<String>,
    },
    /// Reads the config file again.
    Reload,
}

/// Parses one request line strictly: a JSON object naming a known command, with only that
/// command's fields (serde's `deny_unknown_fields` is not enforced for the fields of an
/// internally tagged enum's variants, so the keys are checked against the request as read).
pub fn parse_request(line: &str) -> Result<Request, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
    let Value::Object(given) = &value else {
        return Err(
            "bad request: a request is a JSON object, such as {\"command\":\"status\"}".into(),
        );
    };
    let request: Request =
        serde_json::from_value(value.clone()).map_err(|e| format!("bad request: {e}"))?;
    let known = serde_json::to_value(&request).map_err(|e| format!("bad request: {e}"))?;
    let unknown: Vec<&str> = given
        .keys()
        .filter(|k| known.get(k.as_str()).is_none())
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "bad request: unknown field(s) {} for command {}",
            unknown.join(", "),
            known["command"]
        ));
    }
    Ok(request)
}

/// One (VIP, backend) pair's health in a [`Request::SyncHealth`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthEntry {
    /// The VIP's name.
    pub vip: String,
    /// The backend's address.
    pub backend: IpAddr,
    /// Its health.
    pub healthy: bool,
}

/// Health and drain state set at run time, per (VIP name, backend address).
#[derive(Clone, Debug, Default)]
struct Overrides {
    unhealthy: BTreeSet<(String, IpAddr)>,
    drained: BTreeSet<(String, IpAddr)>,
    /// Pairs whose health was reported (sidecar or operator) at least once: the others count
    /// as healthy because nothing said otherwise yet.
    reported: BTreeSet<(String, IpAddr)>,
}

impl Overrides {
    /// The effective config: unhealthy backends removed, drained ones at weight 0.
    fn apply(&self, base: &Config) -> Config {
        let mut effective = base.clone();
        // The sidecar's section names backends that health may take out of every VIP here; it
        // was validated with the base config, and the data path never reads it.
        effective.healthcheck = None;
        for vip in &mut effective.vips {
            let name = vip.name.clone();
            vip.backends
                .retain(|b| !self.unhealthy.contains(&(name.clone(), b.address)));
            for b in &mut vip.backends {
                if self.drained.contains(&(name.clone(), b.address)) {
                    b.weight = 0;
                }
            }
        }
        effective
    }

    /// Forgets overrides of backends the config no longer has.
    fn prune(&mut self, config: &Config) {
        let exists = |(vip, backend): &(String, IpAddr)| {
            config
                .vip(vip)
                .is_some_and(|v| v.backends.iter().any(|b| b.address == *backend))
        };
        self.unhealthy.retain(exists);
        self.drained.retain(exists);
        self.reported.retain(exists);
    }
}

/// What only a change touches; held (with its lock) while a snapshot compiles.
struct Inner {
    /// The digest of the file contents last read (applied, rejected or held).
    file_digest: Option<u64>,
}

/// A reload from the file watcher that was not applied, because it would remove too much.
#[derive(Clone, Debug, Serialize)]
pub struct Held {
    /// Why.
    pub reason: String,
    /// The digest of the held contents.
    #[serde(skip)]
    pub digest: u64,
}

/// What [`ControlPlane::reload_watched`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchedReload {
    /// Published this generation.
    Applied(u64),
    /// Rejected (logged, counted); the old config keeps serving.
    Rejected(String),
    /// Held, for this reason, until an explicit reload.
    Held(String),
}

/// The state `status` and metrics read, published whole after each change (never locked by a
/// change in progress).
#[derive(Clone, Debug)]
struct View {
    base: Arc<Config>,
    overrides: Overrides,
    reloads_ok: u64,
    reloads_failed: u64,
    last_error: Option<String>,
    held: Option<Held>,
}

/// The control plane of one mux. Cheap to share (`Arc`); every method may be called from any
/// thread (control-socket connections, the signal thread, the file watcher).
pub struct ControlPlane {
    config_path: PathBuf,
    shared: Arc<Shared>,
    /// Serializes changes; see the module invariants.
    inner: Mutex<Inner>,
    view: ArcSwap<View>,
    workers: Mutex<Vec<Arc<Mutex<WorkerReport>>>>,
    started: Instant,
    /// The packet I/O in force, once the node opened its devices.
    io: OnceLock<IoStatus>,
    /// What must follow each publish outside the workers (AF_XDP steering).
    hook: OnceLock<Arc<dyn PublishHook>>,
}

/// The packet I/O a node runs on, as `status` and the metrics show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IoStatus {
    /// `af_xdp` or `af_packet`.
    pub mode: String,
    /// AF_XDP: where the steering program runs, `driver` or `skb`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attach: Option<String>,
    /// AF_XDP: how the sockets are bound, `zero_copy` or `copy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    /// AF_XDP: receive queues with a socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queues: Option<u32>,
    /// Why a preferred mode is not in force (zero-copy, driver mode, AF_XDP itself).
    pub fallbacks: Vec<String>,
}

/// Something outside the workers that must follow the published snapshot: the AF_XDP
/// steering map (which addresses go to the sockets) and the next hops to resolve.
pub trait PublishHook: Send + Sync {
    /// Called before `snapshot` is published: start serving what it adds.
    fn before_publish(&self, snapshot: &Snapshot);
    /// Called after it is published: stop serving what it no longer has.
    fn after_publish(&self, snapshot: &Snapshot);
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

/// Why a control request failed.
pub type ControlError = String;

/// The digest of a config file's contents (`None`: unreadable), to notice a change. Reads it as
/// every `lb` process does ([`lb_core::config::read_config_file`]: a regular file of bounded
/// size, opened without blocking).
#[must_use]
pub fn file_digest(path: &Path) -> Option<u64> {
    lb_core::config::read_config_file(path)
        .ok()
        .map(|b| crate::watch::digest(&b))
}

/// Why a reload seen by the file watcher is held rather than applied: it would remove most
/// VIPs, or leave a VIP that had backends with none. Such a file is more often half-written
/// or truncated than meant; an explicit reload applies it.
#[must_use]
pub fn hold_reason(old: &Config, new: &Config) -> Option<String> {
    let removed: Vec<&str> = old
        .vips
        .iter()
        .filter(|v| new.vip(&v.name).is_none())
        .map(|v| v.name.as_str())
        .collect();
    if !removed.is_empty() && removed.len() * 2 > old.vips.len() {
        return Some(format!(
            "it would remove {} of the {} VIPs ({})",
            removed.len(),
            old.vips.len(),
            removed.join(", ")
        ));
    }
    let emptied: Vec<&str> = old
        .vips
        .iter()
        .filter(|v| !v.backends.is_empty())
        .filter(|v| new.vip(&v.name).is_some_and(|n| n.backends.is_empty()))
        .map(|v| v.name.as_str())
        .collect();
    (!emptied.is_empty())
        .then(|| format!("it would leave VIP {} with no backend", emptied.join(", ")))
}

/// Logs at WARN every VIP and backend `new` no longer has.
fn warn_removed(old: &Config, new: &Config) {
    for v in &old.vips {
        let Some(n) = new.vip(&v.name) else {
            tracing::warn!(vip = %v.name, address = %v.address, backends = v.backends.len(), "VIP removed by the new config");
            continue;
        };
        for b in &v.backends {
            if !n.backends.iter().any(|nb| nb.address == b.address) {
                tracing::warn!(vip = %v.name, backend = %b.address, "backend removed by the new config");
            }
        }
    }
}

/// Logs the node settings a reload cannot apply (they shape the process: devices, threads,
/// sockets) when the new file changes them.
fn warn_restart_only(old: &Config, new: &Config) {
    let (o, n) = (&old.node, &new.node);
    for (field, changed) in [
        ("node.interface", o.interface != n.interface),
        ("node.workers", o.workers != n.workers),
        ("node.io", o.io != n.io),
        (
            "node.conntrack_capacity",
            o.conntrack_capacity != n.conntrack_capacity,
        ),
        ("node.control_socket", o.control_socket != n.control_socket),
        (
            "node.metrics_address",
            o.metrics_address != n.metrics_address,
        ),
    ] {
        if changed {
            tracing::warn!(
                field,
                "changed in the config file; takes effect when lb mux restarts"
            );
        }
    }
}

/// Reads and parses the config file: the config and the digest of the contents read.
fn read_config(path: &Path) -> Result<(Config, u64), ControlError> {
    let bytes =
        lb_core::config::read_config_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let digest = crate::watch::digest(&bytes);
    Ok((parse_config(path, bytes)?, digest))
}

/// Parses config file contents read from `path`.
fn parse_config(path: &Path, bytes: Vec<u8>) -> Result<Config, ControlError> {
    Config::from_bytes(bytes, path).map_err(|e| e.to_string())
}

impl ControlPlane {
    /// Loads `config_path`, compiles generation 1, and returns the control plane with the
    /// [`Shared`] state the workers read.
    pub fn start(config_path: &Path) -> Result<(Arc<Self>, Arc<Shared>), ControlError> {
        let (base, digest) = read_config(config_path)?;
        let snapshot =
            Snapshot::compile(&base, 1).map_err(|e| format!("{}: {e}", config_path.display()))?;
        let shared = Shared::new(snapshot);
        let plane = Arc::new(Self {
            config_path: config_path.to_owned(),
            shared: Arc::clone(&shared),
            inner: Mutex::new(Inner {
                file_digest: Some(digest),
            }),
            view: ArcSwap::from_pointee(View {
                base: Arc::new(base),
                overrides: Overrides::default(),
                reloads_ok: 0,
                reloads_failed: 0,
                last_error: None,
                held: None,
            }),
            workers: Mutex::new(Vec::new()),
            started: Instant::now(),
            io: OnceLock::new(),
            hook: OnceLock::new(),
        });
        plane.log_published(&shared.snapshot.load(), None, "started");
        Ok((plane, shared))
    }

    /// Records the packet I/O the node runs on (once; later calls are ignored).
    pub fn set_io(&self, io: IoStatus) {
        let _ = self.io.set(io);
    }

    /// The packet I/O the node runs on, once recorded.
    #[must_use]
    pub fn io(&self) -> Option<&IoStatus> {
        self.io.get()
    }

    /// Installs what must follow every publish from now on (once; later calls are ignored).
    pub fn set_publish_hook(&self, hook: Arc<dyn PublishHook>) {
        let _ = self.hook.set(hook);
    }

    /// The config file.
    #[must_use]
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The base config in force (the file as last loaded successfully).
    #[must_use]
    pub fn config(&self) -> Config {
        Config::clone(&self.view.load().base)
    }

    /// The digest of the file contents last read, for a watcher to start from.
    #[must_use]
    pub fn file_digest(&self) -> Option<u64> {
        self.lock().file_digest
    }

    /// The shared state.
    #[must_use]
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Registers a worker's report, for status and metrics.
    pub fn add_worker(&self, report: Arc<Mutex<WorkerReport>>) {
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(report);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes a changed [`View`]. Only under the change lock (`_changing`), so no change is
    /// lost between the load and the store.
    fn update_view(&self, _changing: &Inner, change: impl FnOnce(&mut View)) {
        let mut view = View::clone(&self.view.load());
        change(&mut view);
        self.view.store(Arc::new(view));
    }

    /// Compiles `base` with `overrides` and publishes it; on error nothing changes.
    fn publish(
        &self,
        inner: &Inner,
        base: Arc<Config>,
        overrides: Overrides,
        why: &str,
    ) -> Result<u64, ControlError> {
        let effective = overrides.apply(&base);
        let problems = effective.validate();
        if let Some(p) = problems.first() {
            return Err(format!(
                "{}: {p} (after applying health and drain)",
                self.config_path.display()
            ));
        }
        let old = self.shared.snapshot.load_full();
        let generation = old.generation + 1;
        let mut snapshot = Snapshot::compile(&effective, generation)
            .map_err(|e| format!("{}: {e}", self.config_path.display()))?;
        snapshot.use_snat_of(&base);
        let window = u64::from(effective.node.chain_window_seconds) * 1_000_000_000;
        if window > 0
            && !snapshot.chain_from(&old, crate::worker::monotonic_ns().saturating_add(window))
        {
            tracing::warn!(
                generation,
                "out of memory for the previous tables: some GRE VIPs do not chain in this window"
            );
        }
        let snapshot = Arc::new(snapshot);
        let hook = self.hook.get();
        if let Some(h) = hook {
            h.before_publish(&snapshot);
        }
        self.shared.snapshot.store(Arc::clone(&snapshot));
        if let Some(h) = hook {
            h.after_publish(&snapshot);
        }
        self.update_view(inner, |v| {
            v.base = base;
            v.overrides = overrides;
        });
        self.log_published(&snapshot, Some(&old), why);
        Ok(generation)
    }

    /// Logs each VIP of a published snapshot, and at WARN each VIP that has just lost its last
    /// healthy backend of weight above 0 (or starts without one).
    fn log_published(&self, snapshot: &Snapshot, old: Option<&Snapshot>, why: &str) {
        for vip in &snapshot.vips {
            let backends = vip.table.backends().len();
            tracing::info!(
                generation = snapshot.generation,
                vip = %vip.name,
                backends,
                fingerprint = %fingerprint_hex(vip.fingerprint),
                "published ({why})"
            );
            let was_empty = old
                .and_then(|o| o.vips.iter().find(|v| v.name == vip.name))
                .is_some_and(|v| v.table.slots().is_empty());
            if vip.table.slots().is_empty() && !was_empty {
                tracing::warn!(
                    generation = snapshot.generation,
                    vip = %vip.name,
                    configured = self.view.load().base.vip(&vip.name).map_or(0, |v| v.backends.len()),
                    "VIP has no healthy backend with a weight above 0: its new flows are dropped (drop reason no_backend)"
                );
            }
        }
    }

    /// Applies a config read from the file: warns of settings only a restart applies, keeps
    /// the overrides of backends it still has, publishes, and logs what it removed.
    fn apply_file(&self, inner: &Inner, base: Config, why: &str) -> Result<u64, ControlError> {
        let view = self.view.load_full();
        warn_restart_only(&view.base, &base);
        let mut overrides = view.overrides.clone();
        overrides.prune(&base);
        let base = Arc::new(base);
        let generation = self.publish(inner, Arc::clone(&base), overrides, why)?;
        warn_removed(&view.base, &base);
        Ok(generation)
    }

    /// Counts and logs a reload's result.
    fn record(
        &self,
        inner: &Inner,
        trigger: &str,
        result: Result<u64, ControlError>,
    ) -> Result<u64, ControlError> {
        match &result {
            Ok(generation) => {
                self.update_view(inner, |v| {
                    v.reloads_ok += 1;
                    v.last_error = None;
                    v.held = None;
                });
                tracing::info!(trigger, generation, "config reloaded");
            }
            Err(e) => {
                self.update_view(inner, |v| {
                    v.reloads_failed += 1;
                    v.last_error = Some(e.clone());
                });
                tracing::error!(trigger, error = %e, "config rejected; the previous config keeps serving");
            }
        }
        result
    }

    /// Reads the config file again and applies it (an explicit reload: SIGHUP or the control
    /// socket; a held change is applied too). A bad file is rejected and logged, and the old
    /// snapshot keeps serving. Returns the new generation.
    pub fn reload(&self, trigger: &str) -> Result<u64, ControlError> {
        let mut inner = self.lock();
        let result = read_config(&self.config_path).and_then(|(base, digest)| {
            inner.file_digest = Some(digest);
            self.apply_file(&inner, base, trigger)
        });
        self.record(&inner, trigger, result)
    }

    /// Applies contents the file watcher found complete ([`crate::watch::ConfigWatch`]), unless
    /// they are the ones last read. A change that would remove most VIPs or empty a VIP is held
    /// ([`hold_reason`]) until an explicit [`ControlPlane::reload`]. None when nothing was done.
    pub fn reload_watched(&self, bytes: Vec<u8>, digest: u64) -> Option<WatchedReload> {
        const TRIGGER: &str = "file changed";
        let mut inner = self.lock();
        if inner.file_digest == Some(digest) {
            return None;
        }
        inner.file_digest = Some(digest);
        let base = match parse_config(&self.config_path, bytes) {
            Ok(base) => base,
            Err(e) => {
                return Some(WatchedReload::Rejected(
                    self.record(&inner, TRIGGER, Err(e)).unwrap_err(),
                ));
            }
        };
        if let Some(reason) = hold_reason(&self.view.load().base, &base) {
            tracing::warn!(
                file = %self.config_path.display(),
                %reason,
                "config change held, not applied: run `lb ctl reload` or send SIGHUP to apply it"
            );
            self.update_view(&inner, |v| {
                v.held = Some(Held {
                    reason: reason.clone(),
                    digest,
                });
            });
            return Some(WatchedReload::Held(reason));
        }
        let result = self.apply_file(&inner, base, TRIGGER);
        Some(match self.record(&inner, TRIGGER, result) {
            Ok(generation) => WatchedReload::Applied(generation),
            Err(e) => WatchedReload::Rejected(e),
        })
    }

    /// The (VIP, backend) pairs a request names; an error if none.
    fn targets(
        base: &Config,
        backend: IpAddr,
        vip: Option<&str>,
    ) -> Result<Vec<(String, IpAddr)>, ControlError> {
        if let Some(name) = vip {
            let v = base
                .vip(name)
                .ok_or_else(|| format!("no VIP named {name:?}"))?;
            if !v.backends.iter().any(|b| b.address == backend) {
                return Err(format!("VIP {name:?} has no backend {backend}"));
            }
            return Ok(vec![(name.to_owned(), backend)]);
        }
        let all: Vec<_> = base
            .vips
            .iter()
            .filter(|v| v.backends.iter().any(|b| b.address == backend))
            .map(|v| (v.name.clone(), backend))
            .collect();
        if all.is_empty() {
            return Err(format!("no VIP has a backend {backend}"));
        }
        Ok(all)
    }

    fn change_overrides(
        &self,
        backend: IpAddr,
        vip: Option<&str>,
        why: &str,
        change: impl Fn(&mut Overrides, (String, IpAddr)) -> bool,
    ) -> Result<Value, ControlError> {
        let inner = self.lock();
        let view = self.view.load_full();
        let targets = Self::targets(&view.base, backend, vip)?;
        let mut overrides = view.overrides.clone();
        let mut changed = false;
        for t in targets {
            changed |= change(&mut overrides, t);
        }
        if !changed {
            // Nothing for the tables; keep what was reported.
            self.update_view(&inner, |v| v.overrides = overrides);
            let generation = self.shared.snapshot.load().generation;
            return Ok(json!({"ok": true, "changed": false, "generation": generation}));
        }
        let generation = self.publish(&inner, Arc::clone(&view.base), overrides, why)?;
        tracing::info!(%backend, vip = vip.unwrap_or("*"), generation, "{why}");
        Ok(json!({"ok": true, "changed": true, "generation": generation}))
    }

    /// [`Request::SyncHealth`]: every known pair set at once, one snapshot at most.
    fn sync_health(&self, entries: &[HealthEntry]) -> Result<Value, ControlError> {
        let inner = self.lock();
        let view = self.view.load_full();
        let mut overrides = view.overrides.clone();
        let mut ignored = Vec::new();
        let mut changed = 0usize;
        for e in entries {
            let known = view
                .base
                .vip(&e.vip)
                .is_some_and(|v| v.backends.iter().any(|b| b.address == e.backend));
            if !known {
                ignored.push(json!({"vip": e.vip, "backend": e.backend}));
                continue;
            }
            let key = (e.vip.clone(), e.backend);
            overrides.reported.insert(key.clone());
            let flipped = if e.healthy {
                overrides.unhealthy.remove(&key)
            } else {
                overrides.unhealthy.insert(key)
            };
            if flipped {
                changed += 1;
                tracing::info!(vip = %e.vip, backend = %e.backend, healthy = e.healthy, "health from the sidecar");
            }
        }
        let generation = if changed == 0 {
            self.update_view(&inner, |v| v.overrides = overrides);
            self.shared.snapshot.load().generation
        } else {
            self.publish(&inner, Arc::clone(&view.base), overrides, "health synced")?
        };
        Ok(json!({"ok": true, "changed": changed, "ignored": ignored, "generation": generation}))
    }

    /// Executes one request; the answer is a JSON object with `"ok"`.
    pub fn handle(&self, request: &Request) -> Value {
        let result = match request {
            Request::Status => Ok(self.status()),
            Request::Workers => Ok(self.workers_liveness()),
            Request::Reload => self
                .reload("control socket")
                .map(|generation| json!({"ok": true, "generation": generation})),
            Request::SetHealth {
                backend,
                vip,
                healthy,
            } => self.change_overrides(
                *backend,
                vip.as_deref(),
                if *healthy {
                    "backend healthy"
                } else {
                    "backend unhealthy"
                },
                |o, t| {
                    o.reported.insert(t.clone());
                    if *healthy {
                        o.unhealthy.remove(&t)
                    } else {
                        o.unhealthy.insert(t)
                    }
                },
            ),
            Request::SyncHealth { backends } => self.sync_health(backends),
            Request::Drain { backend, vip } => {
                self.change_overrides(*backend, vip.as_deref(), "backend drained", |o, t| {
                    o.drained.insert(t)
                })
            }
            Request::Undrain { backend, vip } => {
                self.change_overrides(*backend, vip.as_deref(), "backend undrained", |o, t| {
                    o.drained.remove(&t)
                })
            }
        };
        result.unwrap_or_else(|e| json!({"ok": false, "error": e}))
    }

    /// Parses and executes one request line; malformed input gets `{"ok": false, "error"}`.
    pub fn handle_line(&self, line: &str) -> Value {
        match parse_request(line) {
            Ok(request) => self.handle(&request),
            Err(e) => json!({"ok": false, "error": e}),
        }
    }

    /// Every worker's report, summed; with per-worker liveness.
    #[must_use]
    pub fn totals(&self) -> Totals {
        let workers = self
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut totals = Totals::default();
        for (id, w) in workers.iter().enumerate() {
            let r = w.lock().unwrap_or_else(PoisonError::into_inner).clone();
            totals.add(id, &r);
        }
        totals
    }

    /// The answer to `workers`: the generation in force and each worker's last report age.
    #[must_use]
    pub fn workers_liveness(&self) -> Value {
        let workers = self
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let list: Vec<Value> = workers
            .iter()
            .enumerate()
            .map(|(id, w)| {
                let r = w.lock().unwrap_or_else(PoisonError::into_inner);
                json!({
                    "id": id,
                    "generation": r.generation,
                    "last_seen_ms": r.heartbeat.map(|h| u64::try_from(h.elapsed().as_millis()).unwrap_or(u64::MAX)),
                })
            })
            .collect();
        json!({
            "ok": true,
            "generation": self.shared.snapshot.load().generation,
            "workers": list,
        })
    }

    /// Reloads from the file so far: (accepted, rejected).
    #[must_use]
    pub fn reloads(&self) -> (u64, u64) {
        let view = self.view.load();
        (view.reloads_ok, view.reloads_failed)
    }

    /// The answer to `status`.
    #[must_use]
    pub fn status(&self) -> Value {
        let view = self.view.load_full();
        let (base, overrides) = (&view.base, &view.overrides);
        let snapshot = self.shared.snapshot.load_full();
        let totals = self.totals();
        let vips: Vec<Value> = base
            .vips
            .iter()
            .map(|v| {
                let compiled = snapshot.vips.iter().find(|c| c.name == v.name);
                let mut slot_counts =
                    vec![0usize; compiled.map_or(0, |c| c.table.backends().len())];
                for &s in compiled.map_or(&[][..], |c| c.table.slots()) {
                    if let Some(n) = slot_counts.get_mut(usize::from(s)) {
                        *n += 1;
                    }
                }
                let backends: Vec<Value> = v
                    .backends
                    .iter()
                    .map(|b| {
                        let key = (v.name.clone(), b.address);
                        let healthy = !overrides.unhealthy.contains(&key);
                        let drained = overrides.drained.contains(&key);
                        let slots = compiled
                            .and_then(|c| {
                                c.table
                                    .backends()
                                    .iter()
                                    .position(|wb| wb.id.0 == b.address)
                            })
                            .and_then(|i| slot_counts.get(i).copied())
                            .unwrap_or(0);
                        let traffic = totals
                            .backends
                            .get(&BackendKey {
                                vip: v.name.clone(),
                                backend: b.address,
                            })
                            .copied()
                            .unwrap_or_default();
                        json!({
                            "address": b.address,
                            "name": b.name,
                            "weight": b.weight,
                            "effective_weight": if healthy && !drained { b.weight } else { 0 },
                            "healthy": healthy,
                            "health_reported": overrides.reported.contains(&key),
                            "drained": drained,
                            "slots": slots,
                            "packets": traffic.packets,
                            "bytes": traffic.bytes,
                        })
                    })
                    .collect();
                let healthy_backends = v
                    .backends
                    .iter()
                    .filter(|b| !overrides.unhealthy.contains(&(v.name.clone(), b.address)))
                    .count();
                let serving = compiled.is_some_and(|c| !c.table.slots().is_empty());
                json!({
                    "name": v.name,
                    "state": if serving { "serving" } else { "no_healthy_backend" },
                    "healthy_backends": healthy_backends,
                    "address": v.address,
                    "protocol": v.protocol,
                    "port": v.port,
                    "encap": v.encap,
                    "table_size": v.table_size,
                    "fingerprint": compiled.map(|c| fingerprint_hex(c.fingerprint)),
                    "backends": backends,
                })
            })
            .collect();
        let drops: BTreeMap<&str, u64> = DropReason::ALL
            .iter()
            .map(|&r| (r.name(), totals.counters.dropped(r)))
            .collect();
        json!({
            "ok": true,
            "node": base.node.name,
            "config": self.config_path,
            "generation": snapshot.generation,
            "uptime_seconds": self.started.elapsed().as_secs(),
            "reloads": {
                "ok": view.reloads_ok,
                "failed": view.reloads_failed,
                "last_error": view.last_error,
                "held": view.held.as_ref().map(|h| &h.reason),
            },
            "vips": vips,
            "io": self.io.get(),
            "counters": {
                "frames": totals.counters.packets,
                "encapsulated": totals.counters.encapsulated,
                "passed": totals.counters.passed,
                "snat_returned": totals.counters.snat_returned,
                "icmp_too_big_sent": totals.counters.icmp_too_big_sent,
                "sent": totals.sent,
                "send_failed": totals.send_failed,
                "kernel_drops": totals.kernel_drops,
                "tx_slow_path": totals.tx_slow_path,
                "device_errors": totals.device_errors,
                "drops": drops,
            },
            "conntrack": {
                "trusted": totals.trusted,
                "untrusted": totals.untrusted,
                "capacity": totals.capacity,
                "hits": totals.conntrack.hits,
                "misses": totals.conntrack.misses,
                "evictions_untrusted": totals.conntrack.evictions_untrusted,
                "evictions_idle_trusted": totals.conntrack.evictions_idle_trusted,
                "evictions_expired": totals.conntrack.evictions_expired,
                "full": totals.conntrack.full,
            },
            "workers": totals.workers.iter().map(|w| json!({
                "id": w.id,
                "generation": w.generation,
                "batches": w.batches,
                "frames": w.frames,
                "largest_batch": w.largest_batch,
                "last_seen_ms": w.last_seen_ms,
            })).collect::<Vec<_>>(),
        })
    }
}

impl crate::socket::ControlHandler for ControlPlane {
    fn handle_line(&self, line: &str) -> Value {
        ControlPlane::handle_line(self, line)
    }

    fn stopping(&self) -> bool {
        self.shared
            .shutdown
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One worker's liveness and batch figures.
#[derive(Clone, Debug, Default)]
pub struct WorkerSummary {
    /// The worker's number.
    pub id: usize,
    /// The generation it last used.
    pub generation: u64,
    /// Batches with frames.
    pub batches: u64,
    /// Frames.
    pub frames: u64,
    /// Largest batch.
    pub largest_batch: u64,
    /// Milliseconds since its loop last went round (None: not yet).
    pub last_seen_ms: Option<u64>,
}

/// Every worker's report, summed.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Forwarding counters.
    pub counters: lb_core::forward::Counters,
    /// Connection-table events.
    pub conntrack: lb_core::conntrack::ConnCounters,
    /// Trusted entries.
    pub trusted: u64,
    /// Untrusted entries.
    pub untrusted: u64,
    /// Slots.
    pub capacity: u64,
    /// Sent packets.
    pub sent: u64,
    /// Packets the kernel refused.
    pub send_failed: u64,
    /// Frames dropped by the kernel before a worker saw them.
    pub kernel_drops: u64,
    /// Packets sent on the kernel's path because the device could not send them.
    pub tx_slow_path: u64,
    /// Device errors.
    pub device_errors: u64,
    /// Per-backend traffic.
    pub backends: BTreeMap<BackendKey, Traffic>,
    /// Per worker.
    pub workers: Vec<WorkerSummary>,
}

impl Totals {
    fn add(&mut self, id: usize, r: &WorkerReport) {
        let c = &mut self.counters;
        c.packets += r.counters.packets;
        c.encapsulated += r.counters.encapsulated;
        c.passed += r.counters.passed;
        c.snat_returned += r.counters.snat_returned;
        c.icmp_too_big_sent += r.counters.icmp_too_big_sent;
        for (sum, d) in c.drops.iter_mut().zip(r.counters.drops) {
            *sum += d;
        }
        let k = &mut self.conntrack;
        k.hits += r.conntrack.hits;
        k.misses += r.conntrack.misses;
        k.inserts += r.conntrack.inserts;
        k.replacements += r.conntrack.replacements;
        k.evictions_untrusted += r.conntrack.evictions_untrusted;
        k.evictions_idle_trusted += r.conntrack.evictions_idle_trusted;
        k.evictions_expired += r.conntrack.evictions_expired;
        k.full += r.conntrack.full;
        k.promotions += r.conntrack.promotions;
        if let Some(o) = r.occupancy {
            self.trusted += o.trusted as u64;
            self.untrusted += o.untrusted as u64;
            self.capacity += o.capacity as u64;
        }
        self.sent += r.sent;
        self.send_failed += r.send_failed;
        self.kernel_drops += r.kernel_drops;
        self.tx_slow_path += r.tx_slow_path;
        self.device_errors += r.device_errors;
        for (key, t) in &r.backends {
            let sum = self.backends.entry(key.clone()).or_default();
            sum.packets += t.packets;
            sum.bytes += t.bytes;
        }
        self.workers.push(WorkerSummary {
            id,
            generation: r.generation,
            batches: r.batches,
            frames: r.counters.packets,
            largest_batch: r.largest_batch,
            last_seen_ms: r
                .heartbeat
                .map(|h| u64::try_from(h.elapsed().as_millis()).unwrap_or(u64::MAX)),
        });
    }
}
