//! The memory budget: what a config costs in memory, checked before anything is built.
//!
//! A mux holds, at the peak of a reload, the snapshot in force and the one being compiled, each
//! with its VIPs' Maglev tables and, for daisy chaining, a copy of the previous table of every
//! GRE VIP; plus one connection table per worker, allocated at start. [`estimate`] adds these up
//! from the config alone, so `lb check-config` prints the figure and validation refuses a config
//! over the node's budget (`node.memory_budget_mb`, by default half of the smallest of the
//! host's memory, the process's cgroup limit and its `ulimit -v`/`-d`) instead of letting a
//! reload abort the process on a failed allocation.
//!
//! **Invariant.** The estimate is never below what [`crate::snapshot::Snapshot::compile`] and
//! the connection tables allocate for their large arrays (slots, bitmaps, conntrack entries);
//! small per-VIP allocations (names, backend lists) are counted per backend.

use std::sync::OnceLock;

use crate::config::{Config, Encap};
use crate::conntrack::ConnTable;
use crate::encap::Tunnel;
use crate::maglev::WeightedBackend;

/// Snapshots alive at the peak of a reload: the one in force and the one being compiled.
pub const GENERATIONS: u64 = 2;

/// Bytes per MiB.
pub const MIB: u64 = 1 << 20;

/// The memory a config needs on a mux.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// One snapshot's tables and per-backend state, with the previous tables it keeps for
    /// daisy chaining.
    pub snapshot_bytes: u64,
    /// Snapshots alive at once at the peak of a reload ([`GENERATIONS`]).
    pub generations: u64,
    /// The scratch space of the largest table build.
    pub build_bytes: u64,
    /// Workers (each with a connection table).
    pub workers: u64,
    /// All workers' connection tables.
    pub conntrack_bytes: u64,
}

impl MemoryEstimate {
    /// The whole: every generation's snapshot, the build scratch and the connection tables.
    #[must_use]
    pub fn total_bytes(&self) -> u64 {
        self.snapshot_bytes
            .saturating_mul(self.generations)
            .saturating_add(self.build_bytes)
            .saturating_add(self.conntrack_bytes)
    }
}

/// The worker count `node.workers` asks for: itself, or one per core for 0.
#[must_use]
pub fn workers(config: &Config) -> u64 {
    match config.node.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
        n => u64::from(n),
    }
}

/// What `config` needs on a mux; see the module docs.
#[must_use]
pub fn estimate(config: &Config) -> MemoryEstimate {
    let per_backend =
        (size_of::<WeightedBackend>() + size_of::<u32>() + size_of::<Option<Tunnel>>() + 64) as u64;
    let chaining = config.node.chain_window_seconds > 0;
    let mut snapshot_bytes = 0u64;
    let mut build_bytes = 0u64;
    for vip in &config.vips {
        let slots = u64::from(vip.table_size);
        let backends = vip.backends.len() as u64;
        let table = slots * 2 + backends * per_backend + 256;
        let kept = if chaining && vip.encap == Encap::Gre {
            2
        } else {
            1
        };
        snapshot_bytes = snapshot_bytes.saturating_add(table * kept);
        // The builder's filled-slot bitmap (at least 2^20 bits) and per-backend cursors.
        build_bytes = build_bytes.max(slots.max(1 << 20) / 8 + backends * 160);
    }
    let workers = workers(config);
    MemoryEstimate {
        snapshot_bytes,
        generations: GENERATIONS,
        build_bytes,
        workers,
        conntrack_bytes: workers.saturating_mul(ConnTable::memory_bytes(
            config.node.conntrack_capacity as usize,
        )),
    }
}

/// The default budget: half of the smallest of the host's memory, this process's cgroup limit
/// and its address-space and data-size limits (`ulimit -v`, `ulimit -d`); None where none can
/// be read (no budget is then enforced by default).
#[must_use]
pub fn default_budget_bytes() -> Option<u64> {
    static BUDGET: OnceLock<Option<u64>> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| meminfo_total(&m));
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        [
            host,
            cgroup_limit(),
            soft_limit(&limits, "Max address space"),
            soft_limit(&limits, "Max data size"),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|smallest| smallest / 2)
    })
}

/// The soft limit of the row `name` of `/proc/self/limits`, in bytes; None if unlimited.
fn soft_limit(limits: &str, name: &str) -> Option<u64> {
    let row = limits.lines().find(|l| l.starts_with(name))?;
    row[name.len()..].split_whitespace().next()?.parse().ok()
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The cgroup v2 `memory.max` of this process's cgroup, if it is a number.
fn cgroup_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.max", path.trim())).ok()?;
    max.trim().parse().ok()
}

/// Formats bytes as MiB with one decimal.
#[must_use]
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_limits_are_read_unless_unlimited() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max data size             unlimited            unlimited            bytes\n\
                      Max address space         4294967296           unlimited            bytes\n";
        assert_eq!(soft_limit(limits, "Max address space"), Some(4_294_967_296));
        assert_eq!(soft_limit(limits, "Max data size"), None);
        assert_eq!(soft_limit(limits, "Max resident set"), None);
    }

    #[test]
    fn meminfo_is_read_in_bytes() {
        let m = "MemTotal:       24575744 kB\nMemFree:  1 kB\n";
        assert_eq!(meminfo_total(m), Some(24_575_744 * 1024));
        assert_eq!(meminfo_total("nothing"), None);
    }

    fn config(vips: usize, table_size: u32, encap: &str, extra_node: &str) -> Config {
        let mut text = format!(
            "[node]\naddress_v4 = \"198.18.0.1\"\nworkers = 2\nconntrack_capacity = 1024\n{extra_node}\n"
        );
        for i in 0..vips {
            text.push_str(&format!(
                "[[vip]]\nname = \"v{i}\"\naddress = \"198.18.100.{}\"\nprotocol = \"tcp\"\nport = 80\nencap = \"{encap}\"\ntable_size = {table_size}\n[[vip.backend]]\naddress = \"198.18.21.2\"\n",
                i + 1
            ));
        }
        Config::from_toml(&text, "t").unwrap()
    }

    #[test]
    fn tables_count_per_generation_and_gre_keeps_a_previous_copy() {
        let ipip = estimate(&config(3, 65537, "ipip", ""));
        assert!(ipip.snapshot_bytes >= 3 * 65537 * 2, "{ipip:?}");
        assert_eq!(ipip.generations, 2);
        assert_eq!(ipip.workers, 2);
        assert!(ipip.conntrack_bytes >= 2 * 1024 * 2);
        let gre = estimate(&config(3, 65537, "gre", ""));
        assert!(
            gre.snapshot_bytes >= 2 * ipip.snapshot_bytes - 3 * 512,
            "{gre:?}"
        );
        let no_chain = estimate(&config(3, 65537, "gre", "chain_window_seconds = 0"));
        assert_eq!(no_chain.snapshot_bytes, ipip.snapshot_bytes);
        assert!(gre.total_bytes() > ipip.total_bytes());
    }
}
