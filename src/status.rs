//! What the nodes' control sockets answer, for a person: `lb status` on a mux, an agent or a
//! health-check sidecar, and `lb ctl`'s answers as one sentence. `--json` on both commands
//! prints the raw answer instead.
//!
//! One renderer for the three kinds of node: the answer's `"role"` picks the layout (`"agent"`,
//! `"healthcheck"`, anything else is a mux). Tables are comfy-table tables, so columns line up
//! whatever the width of the values.
//!
//! Invariant: rendering reads the answer only through lookups that cannot fail, so any JSON
//! renders and nothing panics; a key the answer does not have is simply not shown (a column
//! appears when at least one row has its key), so an older or newer node's answer renders too.
//! Counter groups (`counters`, `conntrack`) are rendered generically as name/value rows, so a
//! counter added to a node shows up without a change here.

use std::fmt::Write as _;
use std::net::IpAddr;

use comfy_table::{Table, presets::NOTHING};
use lb_dataplane::control::Request;
use serde_json::Value;

use crate::table::right_align;

/// Renders a `status` answer of any node (mux, agent, health-check sidecar). An answer with
/// `"ok": false` renders as `error: …`.
#[must_use]
pub fn render(status: &Value) -> String {
    if status["ok"] != true {
        return format!("error: {}\n", text(&status["error"]));
    }
    match status["role"].as_str() {
        Some("agent") => render_agent(status),
        Some("healthcheck") => render_sidecar(status),
        _ => render_mux(status),
    }
}

/// A value as a table cell: strings as they are, booleans `yes`/`no`, `null` as `-`, arrays
/// joined with commas, other values as JSON.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::Bool(true) => "yes".to_owned(),
        Value::Bool(false) => "no".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// `key` of `v` as text, if `v` has it.
fn field(v: &Value, key: &str) -> Option<String> {
    v.get(key).map(text)
}

/// How a [`Column`] finds its cell in a row (`None`: the row does not have it).
type CellOf<'a> = Box<dyn Fn(&Value) -> Option<String> + 'a>;

/// One column of a [`rows_table`]: its header, whether it is numeric (right-aligned), and
/// the cell of a row (`None`: the row does not have it).
struct Column<'a> {
    header: &'a str,
    numeric: bool,
    cell: CellOf<'a>,
}

impl<'a> Column<'a> {
    /// The column of key `key`.
    fn key(key: &'a str, header: &'a str, numeric: bool) -> Self {
        Self {
            header,
            numeric,
            cell: Box::new(move |row| field(row, key)),
        }
    }

    /// A column computed from the row.
    fn with(header: &'a str, numeric: bool, cell: impl Fn(&Value) -> Option<String> + 'a) -> Self {
        Self {
            header,
            numeric,
            cell: Box::new(cell),
        }
    }
}

/// A table of `rows` with the `columns` that at least one row has; `None` if there are no
/// rows. A row without a shown column's key has an empty cell.
fn rows_table(rows: &[Value], columns: &[Column<'_>]) -> Option<Table> {
    if rows.is_empty() {
        return None;
    }
    let shown: Vec<&Column<'_>> = columns
        .iter()
        .filter(|c| rows.iter().any(|r| (c.cell)(r).is_some()))
        .collect();
    let mut t = Table::new();
    t.load_style(NOTHING)
        .set_header(shown.iter().map(|c| c.header));
    for row in rows {
        t.add_row(shown.iter().map(|c| (c.cell)(row).unwrap_or_default()));
    }
    for (i, c) in shown.iter().enumerate() {
        if c.numeric {
            right_align(&mut t, i..i + 1);
        }
    }
    Some(t)
}

/// A counter group (an object of numbers, possibly nested one level, as the mux's
/// `counters.drops`) as name/value rows. In a nested group only the non-zero entries are
/// listed (`drops.no_backend`); a nested group that is all zero is one row `drops.*  0`.
fn counters_table(group: &Value) -> Option<Table> {
    let map = group.as_object()?;
    let mut t = Table::new();
    t.load_style(NOTHING).set_header(["counter", "value"]);
    for (name, value) in map {
        match value {
            Value::Object(inner) => {
                let nonzero: Vec<(&String, &Value)> = inner
                    .iter()
                    .filter(|(_, v)| v.as_u64() != Some(0))
                    .collect();
                if nonzero.is_empty() {
                    t.add_row([format!("{name}.*"), "0".to_owned()]);
                }
                for (k, v) in nonzero {
                    t.add_row([format!("{name}.{k}"), text(v)]);
                }
            }
            other => {
                t.add_row([name.clone(), text(other)]);
            }
        }
    }
    right_align(&mut t, 1..2);
    (t.row_count() > 0).then_some(t)
}

/// Appends `title` and `table` (if any) to `s`.
fn section(s: &mut String, title: &str, table: Option<Table>) {
    if let Some(t) = table {
        let _ = writeln!(s, "\n{title}\n{t}");
    }
}

/// `label value` pairs of the keys `v` has, joined by two spaces.
fn pairs(v: &Value, keys: &[(&str, &str)]) -> String {
    keys.iter()
        .filter_map(|&(key, label)| field(v, key).map(|value| format!("{label} {value}")))
        .collect::<Vec<_>>()
        .join("  ")
}

/// A node's first line: `node NAME (ROLE)` and the `keys` it has.
fn heading(status: &Value, role: &str, keys: &[(&str, &str)]) -> String {
    let node = match field(status, "node") {
        Some(name) => format!("node {name} ({role})"),
        None => role.to_owned(),
    };
    let rest = pairs(status, keys);
    if rest.is_empty() {
        node
    } else {
        format!("{node}  {rest}")
    }
}

fn array(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn render_mux(status: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}",
        heading(
            status,
            "mux",
            &[
                ("generation", "generation"),
                ("uptime_seconds", "uptime (s)"),
                ("config", "config"),
            ]
        )
    );
    let reloads = &status["reloads"];
    if reloads.is_object() {
        let _ = writeln!(
            s,
            "reloads {}",
            pairs(reloads, &[("ok", "ok"), ("failed", "failed")])
        );
        if let Some(e) = reloads["last_error"].as_str() {
            let _ = writeln!(s, "last reload error: {e}");
        }
        if let Some(held) = reloads["held"].as_str() {
            let _ = writeln!(
                s,
                "!! a change of the config file is HELD: {held}; `lb ctl reload` or SIGHUP applies it"
            );
        }
    }
    let io = &status["io"];
    if io.is_object() {
        let _ = writeln!(
            s,
            "io {}",
            pairs(
                io,
                &[
                    ("mode", "mode"),
                    ("attach", "xdp"),
                    ("bind", "bind"),
                    ("queues", "queues")
                ]
            )
        );
        for why in array(&io["fallbacks"]) {
            let _ = writeln!(s, "io fallback: {}", text(&why));
        }
    }
    for vip in array(&status["vips"]) {
        render_vip(&mut s, &vip);
    }
    section(&mut s, "counters", counters_table(&status["counters"]));
    section(&mut s, "conntrack", counters_table(&status["conntrack"]));
    section(
        &mut s,
        "workers",
        rows_table(
            &array(&status["workers"]),
            &[
                Column::key("id", "worker", true),
                Column::key("generation", "generation", true),
                Column::key("frames", "frames", true),
                Column::key("batches", "batches", true),
                Column::key("largest_batch", "largest batch", true),
                Column::key("last_seen_ms", "last seen (ms ago)", true),
            ],
        ),
    );
    s
}

/// One VIP of a mux's status: a heading, a warning row when it has no healthy backend, and
/// its backends.
fn render_vip(s: &mut String, vip: &Value) {
    let protocol_port = match (vip.get("protocol"), vip.get("port")) {
        (Some(p), Some(n)) => Some(format!("{}/{}", text(p), text(n))),
        _ => None,
    };
    let mut heading = vec![format!("VIP {}", text(&vip["name"]))];
    heading.extend(field(vip, "address"));
    heading.extend(protocol_port);
    heading.push(pairs(
        vip,
        &[
            ("encap", "encap"),
            ("table_size", "table size"),
            ("fingerprint", "fingerprint"),
            ("healthy_backends", "healthy backends"),
            ("state", "state"),
        ],
    ));
    let _ = writeln!(s, "\n{}", heading.join("  ").trim_end());
    if vip["state"] == "no_healthy_backend" {
        let _ = writeln!(
            s,
            "  !! WARNING: VIP {} has no healthy backend: its new connections are dropped (no_backend)",
            text(&vip["name"])
        );
    }
    let backend = |b: &Value| {
        let address = field(b, "address")?;
        Some(match b["name"].as_str() {
            Some(name) => format!("{address} ({name})"),
            None => address,
        })
    };
    if let Some(t) = rows_table(
        &array(&vip["backends"]),
        &[
            Column::with("backend", false, backend),
            Column::key("weight", "weight", true),
            Column::key("effective_weight", "effective", true),
            Column::with("healthy", false, |b| {
                let healthy = field(b, "healthy")?;
                // Healthy because nothing said otherwise yet (the sidecar's first verdict).
                Some(if b["health_reported"] == false && b["healthy"] == true {
                    format!("{healthy} (not probed yet)")
                } else {
                    healthy
                })
            }),
            Column::key("drained", "drained", false),
            Column::key("slots", "slots", true),
            Column::key("packets", "packets", true),
            Column::key("bytes", "bytes", true),
        ],
    ) {
        let _ = writeln!(s, "{t}");
    }
}

fn render_agent(status: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}",
        heading(
            status,
            "agent",
            &[
                ("tun", "tun"),
                ("healthy", "healthy"),
                ("last_seen_ms", "last tunnel packet (ms ago)"),
            ]
        )
    );
    if let Some(a) = field(status, "addresses") {
        let _ = writeln!(s, "addresses: {a}");
    }
    if let Some(m) = field(status, "muxes") {
        let _ = writeln!(s, "accepts tunnels from: {m}");
    }
    section(&mut s, "counters", counters_table(&status["counters"]));
    section(
        &mut s,
        "egress SNAT",
        rows_table(
            &array(&status["snat"]),
            &[
                Column::key("address", "address", false),
                Column::with("port ranges", false, |t| t.get("ranges").map(port_ranges)),
                Column::key("active_mappings", "active mappings", true),
                Column::key("ports_in_use", "ports in use", true),
            ],
        ),
    );
    s
}

/// Ranges shown by [`port_ranges`] before it abbreviates.
const RANGES_SHOWN: usize = 3;

/// An agent's SNAT port ranges (`["1024-1031", …]`, often hundreds) in one cell: the first
/// [`RANGES_SHOWN`], then how many ranges and ports there are in all.
fn port_ranges(ranges: &Value) -> String {
    let all: Vec<String> = ranges.as_array().into_iter().flatten().map(text).collect();
    let ports: u64 = all
        .iter()
        .filter_map(|r| {
            let (a, b) = r.split_once('-')?;
            let (a, b) = (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?);
            b.checked_sub(a).map(|d| d + 1)
        })
        .sum();
    let mut shown = all
        .iter()
        .take(RANGES_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if all.len() > RANGES_SHOWN {
        shown.push_str(", …");
    }
    format!("{shown} ({} ranges, {ports} ports)", all.len())
}

/// A health check's state in one cell: `up, ok 1.2 ms, 0 transitions` (`-`: no such check).
fn check_cell(c: &Value) -> String {
    if !c.is_object() {
        return "-".to_owned();
    }
    let last = match (c["last_success"].as_bool(), c["last_latency_ms"].as_f64()) {
        (Some(true), Some(ms)) => format!("ok {ms:.1} ms"),
        (Some(true), None) => "ok".to_owned(),
        (Some(false), _) => format!("fail ({})", text(&c["last_error"])),
        (None, _) => "not probed yet".to_owned(),
    };
    let state = if c["healthy"] == true { "up" } else { "down" };
    match field(c, "transitions") {
        Some(n) => format!("{state}, {last}, {n} transitions"),
        None => format!("{state}, {last}"),
    }
}

fn render_sidecar(status: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}",
        heading(status, "health-check sidecar", &[("config", "config")])
    );
    section(
        &mut s,
        "muxes",
        rows_table(
            &array(&status["muxes"]),
            &[
                Column::key("socket", "socket", false),
                Column::key("connected", "connected", false),
                Column::key("full_syncs", "full syncs", true),
                Column::key("updates", "updates", true),
                Column::key("last_error", "last error", false),
            ],
        ),
    );
    let bgp = &status["bgp"];
    if bgp.is_object() {
        let _ = writeln!(
            s,
            "\nBGP {}",
            pairs(
                bgp,
                &[
                    ("speaker", "speaker"),
                    ("node_healthy", "node healthy"),
                    ("reason", "why")
                ]
            )
        );
        if let Some(t) = rows_table(
            &array(&bgp["addresses"]),
            &[
                Column::key("address", "address", false),
                Column::with("route", false, |a| {
                    a.get("announced")
                        .map(|v| if v == true { "announced" } else { "withdrawn" }.to_owned())
                }),
                Column::key("reason", "why", false),
            ],
        ) {
            let _ = writeln!(s, "{t}");
        }
    }
    section(
        &mut s,
        "backends",
        rows_table(
            &array(&status["backends"]),
            &[
                Column::key("vip", "VIP", false),
                Column::key("backend", "backend", false),
                Column::with("state", false, |b| {
                    b.get("healthy")
                        .map(|h| if h == true { "healthy" } else { "UNHEALTHY" }.to_owned())
                }),
                Column::with("service check", false, |b| b.get("service").map(check_cell)),
                Column::with("agent check", false, |b| b.get("agent").map(check_cell)),
            ],
        ),
    );
    s
}

/// `lb ctl`'s answer to `request` as one sentence, e.g. `generation 7: backend 198.18.21.2
/// drained in VIP web`, or `nothing changed (generation 7 stays in force)`. The caller handles
/// answers with `"ok": false`.
#[must_use]
pub fn render_ctl(request: &Request, answer: &Value) -> String {
    let generation = text(&answer["generation"]);
    let change = |backend: &IpAddr, vip: &Option<String>, what: &str| {
        if answer["changed"] == false {
            return format!("nothing changed: generation {generation} stays in force");
        }
        let scope = match vip {
            Some(v) => format!("in VIP {v}"),
            None => "in every VIP that has it".to_owned(),
        };
        format!("generation {generation}: backend {backend} {what} {scope}")
    };
    let sentence = match request {
        Request::Drain { backend, vip } => change(backend, vip, "drained"),
        Request::Undrain { backend, vip } => change(backend, vip, "undrained"),
        Request::SetHealth {
            backend,
            vip,
            healthy,
        } => change(
            backend,
            vip,
            if *healthy {
                "marked healthy"
            } else {
                "marked unhealthy"
            },
        ),
        Request::Reload => format!("config reloaded: generation {generation}"),
        Request::SyncHealth { .. } => {
            let ignored = array(&answer["ignored"]).len();
            format!(
                "health synced: {} changed, {ignored} ignored; generation {generation}",
                text(&answer["changed"])
            )
        }
        Request::Status | Request::Workers => return render(answer),
    };
    let mut line = sentence;
    line.push('\n');
    line
}
