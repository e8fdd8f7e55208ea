//! `lb table CONFIG` (slots, shares, balance and fingerprint of each VIP's Maglev table) and
//! `lb table diff OLD NEW` (which share of new flows moves, and which backends gain and lose).
//!
//! Both print the same figures as text or as JSON (`--json`); the JSON field names are stable.

use std::collections::BTreeSet;
use std::io::Write;

use anyhow::{Result, bail};
use comfy_table::{CellAlignment, Table, presets::NOTHING};
use lb_core::config::{Config, VipConfig};
use lb_core::maglev::{MaglevTable, TableDiff, fingerprint_hex};
use serde_json::{Value, json};

/// One VIP's table with the figures `lb table` reports.
struct VipReport<'a> {
    vip: &'a VipConfig,
    table: MaglevTable,
    slots: Vec<u32>,
}

impl<'a> VipReport<'a> {
    fn new(vip: &'a VipConfig) -> Result<Self> {
        let table = vip.table()?;
        let slots = table.slot_counts();
        Ok(Self { vip, table, slots })
    }

    /// max/min of slots per unit of weight over backends with weight > 0 (1.0 = perfect).
    fn max_over_min(&self) -> Option<f64> {
        let per_weight = self
            .table
            .backends()
            .iter()
            .zip(&self.slots)
            .filter(|(b, _)| b.weight > 0)
            .map(|(b, &s)| f64::from(s) / f64::from(b.weight));
        let (min, max) =
            per_weight.fold((f64::INFINITY, 0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
        (min > 0.0 && min.is_finite()).then(|| max / min)
    }

    fn json(&self) -> Value {
        let size = f64::from(self.table.size());
        let backends: Vec<Value> = self
            .table
            .backends()
            .iter()
            .zip(&self.slots)
            .map(|(b, &s)| {
                let name = self.vip.backend(b.id).and_then(|c| c.name.clone());
                json!({"address": b.id.to_string(), "name": name, "weight": b.weight, "slots": s, "share": f64::from(s) / size})
            })
            .collect();
        json!({
            "name": self.vip.name,
            "address": self.vip.address.to_string(),
            "protocol": self.vip.protocol.to_string(),
            "port": self.vip.port.to_string(),
            "encap": self.vip.encap.to_string(),
            "table_size": self.table.size(),
            "fingerprint": fingerprint_hex(self.table.fingerprint()),
            "max_over_min": self.max_over_min(),
            "backends": backends,
        })
    }

    fn text(&self, out: &mut dyn Write) -> Result<()> {
        let vip = self.vip;
        writeln!(
            out,
            "VIP {} {} {}/{} encap {}, table size {}, fingerprint {}",
            vip.name,
            vip.address,
            vip.protocol,
            vip.port,
            vip.encap,
            self.table.size(),
            fingerprint_hex(self.table.fingerprint())
        )?;
        let mut t = Table::new();
        t.load_style(NOTHING)
            .set_header(["backend", "name", "weight", "slots", "share"]);
        let size = f64::from(self.table.size());
        for (b, &s) in self.table.backends().iter().zip(&self.slots) {
            let name = vip
                .backend(b.id)
                .and_then(|c| c.name.clone())
                .unwrap_or_default();
            t.add_row([
                b.id.to_string(),
                name,
                b.weight.to_string(),
                s.to_string(),
                format!("{:.3} %", 100.0 * f64::from(s) / size),
            ]);
        }
        right_align(&mut t, 2..5);
        writeln!(out, "{t}")?;
        match self.max_over_min() {
            Some(r) => writeln!(out, "balance: max/min slots per unit of weight = {r:.4}")?,
            None => writeln!(
                out,
                "balance: no backend has weight above 0; new flows are dropped"
            )?,
        }
        Ok(())
    }
}

/// Right-aligns the numeric `columns` of a text table.
pub(crate) fn right_align(t: &mut Table, columns: std::ops::Range<usize>) {
    for col in columns {
        if let Some(c) = t.column_mut(col) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
}

/// `lb table CONFIG [--vip NAME] [--json]`.
pub fn show(config: &Config, vip: Option<&str>, as_json: bool, out: &mut dyn Write) -> Result<()> {
    let vips: Vec<&VipConfig> = match vip {
        Some(name) => match config.vip(name) {
            Some(v) => vec![v],
            None => {
                let known: Vec<&str> = config.vips.iter().map(|v| v.name.as_str()).collect();
                bail!(
                    "no VIP named {name:?}; the config has: {}",
                    known.join(", ")
                );
            }
        },
        None => config.vips.iter().collect(),
    };
    let reports = vips
        .into_iter()
        .map(VipReport::new)
        .collect::<Result<Vec<_>>>()?;
    if as_json {
        let vips: Vec<Value> = reports.iter().map(VipReport::json).collect();
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&json!({ "vips": vips }))?
        )?;
    } else {
        for (i, r) in reports.iter().enumerate() {
            if i > 0 {
                writeln!(out)?;
            }
            r.text(out)?;
        }
    }
    Ok(())
}

/// Whether two sections of a VIP (same name) serve the same address, protocol, port and
/// encapsulation.
fn same_service(a: &VipConfig, b: &VipConfig) -> bool {
    a.address == b.address && a.protocol == b.protocol && a.port == b.port && a.encap == b.encap
}

/// `lb table diff OLD NEW [--json]`: per VIP name, the share of new flows that move, and its
/// status: `added`, `removed`, `unchanged` (same address, protocol, port and encapsulation, and
/// the same table: same fingerprint, i.e. every slot maps to the same backend) or `changed`.
pub fn diff(old: &Config, new: &Config, as_json: bool, out: &mut dyn Write) -> Result<()> {
    let names: BTreeSet<&str> = old
        .vips
        .iter()
        .chain(&new.vips)
        .map(|v| v.name.as_str())
        .collect();
    let mut entries = Vec::new();
    for name in names {
        let (a, b) = (old.vip(name), new.vip(name));
        let table = |v: Option<&VipConfig>| v.map(VipConfig::table).transpose();
        let (ta, tb) = (table(a)?, table(b)?);
        let empty = MaglevTable::default();
        let d = ta
            .as_ref()
            .unwrap_or(&empty)
            .diff(tb.as_ref().unwrap_or(&empty));
        let fingerprints = (
            ta.as_ref().map(MaglevTable::fingerprint),
            tb.as_ref().map(MaglevTable::fingerprint),
        );
        let status = match (a, b) {
            (Some(_), None) => "removed",
            (None, Some(_)) => "added",
            (Some(a), Some(b)) if same_service(a, b) && fingerprints.0 == fingerprints.1 => {
                "unchanged"
            }
            _ => "changed",
        };
        entries.push((name, status, d, fingerprints));
    }
    if as_json {
        let vips: Vec<Value> = entries
            .iter()
            .map(|(name, status, d, (fa, fb))| {
                json!({
                    "name": name,
                    "status": status,
                    "old_fingerprint": fa.map(fingerprint_hex),
                    "new_fingerprint": fb.map(fingerprint_hex),
                    "old_table_size": d.old_size,
                    "new_table_size": d.new_size,
                    "changed_slots": d.changed_slots,
                    "moved_fraction": d.moved_fraction,
                    "backends": d.backends.iter().map(|b| json!({
                        "address": b.id.to_string(),
                        "old_share": b.old_share,
                        "new_share": b.new_share,
                        "gained": b.gained,
                        "lost": b.lost,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&json!({ "vips": vips }))?
        )?;
        return Ok(());
    }
    for (i, (name, status, d, _)) in entries.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        write_diff_text(name, status, d, out)?;
    }
    Ok(())
}

fn write_diff_text(name: &str, status: &str, d: &TableDiff, out: &mut dyn Write) -> Result<()> {
    let slots = match d.changed_slots {
        Some(c) => format!(" ({c} of {} slots)", d.new_size),
        None if d.old_size != d.new_size && status == "changed" => {
            format!(
                " (table size {} -> {}: slots are not comparable)",
                d.old_size, d.new_size
            )
        }
        None => String::new(),
    };
    writeln!(
        out,
        "VIP {name} ({status}): {:.3} % of new flows move{slots}",
        100.0 * d.moved_fraction
    )?;
    let mut t = Table::new();
    t.load_style(NOTHING)
        .set_header(["backend", "old share", "new share", "gains", "loses"]);
    let pct = |x: f64| format!("{:.3} %", 100.0 * x);
    for b in d.backends.iter().filter(|b| b.gained > 0.0 || b.lost > 0.0) {
        t.add_row([
            b.id.to_string(),
            pct(b.old_share),
            pct(b.new_share),
            pct(b.gained),
            pct(b.lost),
        ]);
    }
    if t.row_count() > 0 {
        right_align(&mut t, 1..5);
        writeln!(out, "{t}")?;
    }
    Ok(())
}
