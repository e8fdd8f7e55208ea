//! Prometheus metrics (the `metrics` crate and its Prometheus exporter), served on
//! `node.metrics_address` (loopback by default) at `/metrics`.
//!
//! Workers never touch the metrics registry: they publish [`crate::worker::WorkerReport`]s, and
//! one thread here copies their sums into the registry every [`UPDATE_INTERVAL`]. Counters are
//! set to the summed cumulative values (`absolute`), so a scrape sees monotonic counters.
//!
//! Metric names (all prefixed `lb_`): `frames_total`, `encapsulated_total`, `passed_total`,
//! `icmp_too_big_sent_total`, `snat_returned_total`, `drops_total{reason}`, `backend_packets_total{vip,backend}`,
//! `backend_bytes_total{vip,backend}`, `vip_packets_total{vip}`, `vip_bytes_total{vip}`,
//! `conntrack_entries{class}`, `conntrack_capacity`, `conntrack_evictions_total{cause}`,
//! `conntrack_lookups_total{result}`, `conntrack_full_total`, `sent_total`, `send_failed_total`,
//! `kernel_drops_total`, `tx_slow_path_total`, `io_mode{mode,attach,bind}` (value 1),
//! `device_errors_total`, `reloads_total{result}`, `config_generation`,
//! `table_info{vip,fingerprint}` (value 1), `worker_batches_total{worker}`,
//! `worker_frames_total{worker}`, `worker_largest_batch{worker}`,
//! `worker_last_seen_seconds{worker}`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use lb_core::forward::DropReason;
use lb_core::maglev::fingerprint_hex;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_util::MetricKindMask;

use crate::control::ControlPlane;

/// How often the registry is refreshed from the workers' reports.
pub const UPDATE_INTERVAL: Duration = Duration::from_secs(1);

/// Installs the Prometheus exporter on `address` (once per process).
pub fn install(address: SocketAddr) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(address)
        // A table's old fingerprint series disappears once a reload replaced it.
        .idle_timeout(MetricKindMask::GAUGE, Some(10 * UPDATE_INTERVAL))
        .install()
        .map_err(|e| format!("metrics exporter on {address}: {e}"))?;
    tracing::info!(%address, "metrics exporter listening on /metrics");
    Ok(())
}

/// Installs the exporter on `address` and starts the thread that refreshes it from the mux's
/// control plane.
pub fn start(plane: Arc<ControlPlane>, address: SocketAddr) -> Result<(), String> {
    install(address)?;
    thread::Builder::new()
        .name("lb-metrics".into())
        .spawn(move || {
            while !plane.shared().shutdown.load(Ordering::Relaxed) {
                update(&plane);
                thread::sleep(UPDATE_INTERVAL);
            }
        })
        .map_err(|e| format!("metrics thread: {e}"))?;
    Ok(())
}

/// Copies the current sums into the registry.
pub fn update(plane: &ControlPlane) {
    let totals = plane.totals();
    let c = &totals.counters;
    counter!("lb_frames_total").absolute(c.packets);
    counter!("lb_encapsulated_total").absolute(c.encapsulated);
    counter!("lb_passed_total").absolute(c.passed);
    counter!("lb_snat_returned_total").absolute(c.snat_returned);
    counter!("lb_icmp_too_big_sent_total").absolute(c.icmp_too_big_sent);
    for reason in DropReason::ALL {
        counter!("lb_drops_total", "reason" => reason.name()).absolute(c.dropped(reason));
    }
    let mut per_vip: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (key, t) in &totals.backends {
        let backend = key.backend.to_string();
        counter!("lb_backend_packets_total", "vip" => key.vip.clone(), "backend" => backend.clone())
            .absolute(t.packets);
        counter!("lb_backend_bytes_total", "vip" => key.vip.clone(), "backend" => backend)
            .absolute(t.bytes);
        let v = per_vip.entry(key.vip.as_str()).or_default();
        v.0 += t.packets;
        v.1 += t.bytes;
    }
    for (vip, (packets, bytes)) in per_vip {
        counter!("lb_vip_packets_total", "vip" => vip.to_owned()).absolute(packets);
        counter!("lb_vip_bytes_total", "vip" => vip.to_owned()).absolute(bytes);
    }
    if let Some(io) = plane.io() {
        gauge!(
            "lb_io_mode",
            "mode" => io.mode.clone(),
            "attach" => io.attach.clone().unwrap_or_default(),
            "bind" => io.bind.clone().unwrap_or_default()
        )
        .set(1.0);
    }
    gauge!("lb_conntrack_entries", "class" => "trusted").set(totals.trusted as f64);
    gauge!("lb_conntrack_entries", "class" => "untrusted").set(totals.untrusted as f64);
    gauge!("lb_conntrack_capacity").set(totals.capacity as f64);
    let k = &totals.conntrack;
    counter!("lb_conntrack_evictions_total", "cause" => "untrusted")
        .absolute(k.evictions_untrusted);
    counter!("lb_conntrack_evictions_total", "cause" => "idle_trusted")
        .absolute(k.evictions_idle_trusted);
    counter!("lb_conntrack_evictions_total", "cause" => "expired").absolute(k.evictions_expired);
    counter!("lb_conntrack_lookups_total", "result" => "hit").absolute(k.hits);
    counter!("lb_conntrack_lookups_total", "result" => "miss").absolute(k.misses);
    counter!("lb_conntrack_full_total").absolute(k.full);
    counter!("lb_sent_total").absolute(totals.sent);
    counter!("lb_send_failed_total").absolute(totals.send_failed);
    counter!("lb_kernel_drops_total").absolute(totals.kernel_drops);
    counter!("lb_tx_slow_path_total").absolute(totals.tx_slow_path);
    counter!("lb_device_errors_total").absolute(totals.device_errors);
    let (reloads_ok, reloads_failed) = plane.reloads();
    counter!("lb_reloads_total", "result" => "ok").absolute(reloads_ok);
    counter!("lb_reloads_total", "result" => "failed").absolute(reloads_failed);
    let snapshot = plane.shared().snapshot.load();
    gauge!("lb_config_generation").set(snapshot.generation as f64);
    for vip in &snapshot.vips {
        gauge!("lb_table_info", "vip" => vip.name.clone(), "fingerprint" => fingerprint_hex(vip.fingerprint))
            .set(1.0);
    }
    for w in &totals.workers {
        let id = w.id.to_string();
        counter!("lb_worker_batches_total", "worker" => id.clone()).absolute(w.batches);
        counter!("lb_worker_frames_total", "worker" => id.clone()).absolute(w.frames);
        gauge!("lb_worker_largest_batch", "worker" => id.clone()).set(w.largest_batch as f64);
        if let Some(ms) = w.last_seen_ms {
            gauge!("lb_worker_last_seen_seconds", "worker" => id).set(ms as f64 / 1000.0);
        }
    }
}
