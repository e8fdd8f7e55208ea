//! `lb bench table`: the lookup-table benchmark for operators, and the deterministic inputs that
//! the criterion benches (`benches/maglev.rs`) share with it.
//!
//! For each implementation (this project's `lb-core`, and the `maglev-hash` crate as the
//! baseline measured in the same run), each table size M and backend count N, it reports the
//! median build time, the median lookup time per flow (5-tuple hash included), and for
//! `lb-core` the balance (max/min slots) and the share of flows that move when one backend is
//! removed. The `maglev-hash` crate does not expose its slots, so those two are `null` for it.
//!
//! Timings on a shared machine are noisy: the figure to quote is the ratio against the baseline
//! of the same run (`ratio_build_vs_maglev_hash`), not the absolute times.

use std::hint::black_box;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::Result;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use indicatif::{ProgressBar, ProgressStyle};
use lb_core::FlowKey;
use lb_core::flow::PROTO_TCP;
use lb_core::hash::xxh3;
use lb_core::maglev::{
    BackendId, DEFAULT_TABLE_SIZE, LARGE_TABLE_SIZE, MaglevBuilder, MaglevTable, WeightedBackend,
};
use serde::Serialize;

/// `n` backends of weight 1 at 198.18.0.1, 198.18.0.2, …: the benchmarks' fixed input.
#[must_use]
pub fn backends(n: u32) -> Vec<WeightedBackend> {
    (1..=n)
        .map(|i| WeightedBackend {
            id: BackendId(IpAddr::V4(Ipv4Addr::from(0xc612_0000 + i))),
            weight: 1,
        })
        .collect()
}

/// `n` TCP flows to the VIP 198.18.100.1:80 from pseudo-random clients (a fixed sequence).
#[must_use]
pub fn flows(n: usize) -> Vec<FlowKey> {
    (0..n as u64)
        .map(|i| {
            let r = xxh3(&i.to_le_bytes(), 0x6265_6e63_6866_6c77);
            let client = Ipv4Addr::from(0xc612_0000 | (r as u32 & 0x0001_ffff));
            FlowKey::v4(
                client,
                Ipv4Addr::new(198, 18, 100, 1),
                PROTO_TCP,
                (r >> 32) as u16 | 1024,
                80,
            )
        })
        .collect()
}

/// An implementation under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Implementation {
    /// This project's builder.
    #[serde(rename = "lb-core")]
    LbCore,
    /// The `maglev-hash` crate from crates.io (SipHash, `%` per probe).
    #[serde(rename = "maglev-hash")]
    MaglevHash,
}

/// One measured case, one JSON object of `lb bench table --json`.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    /// The implementation.
    #[serde(rename = "impl")]
    pub implementation: Implementation,
    /// Table size M.
    pub m: u32,
    /// Number of backends N.
    pub n: u32,
    /// Median build time, milliseconds.
    pub build_ms_median: f64,
    /// Median lookup time per flow (5-tuple hash + table index), nanoseconds.
    pub lookup_ns_median: f64,
    /// Largest over smallest slot count (1.0 = perfect); `None` where slots are not visible.
    pub max_over_min: Option<f64>,
    /// Share of flows that move when one backend of N is removed (ideal: 1/N).
    pub disruption_remove_one: Option<f64>,
    /// Build runs behind the median.
    pub build_runs: usize,
}

/// The closing JSON object: the ratio to quote.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// lb-core's median build time over maglev-hash's, M = 65537, N = 1000 (below 1: faster).
    pub ratio_build_vs_maglev_hash: f64,
    /// The same at M = 655373, N = 1000.
    pub ratio_build_vs_maglev_hash_large: f64,
    /// lb-core's median lookup time over maglev-hash's, M = 65537, N = 1000.
    pub ratio_lookup_vs_maglev_hash: f64,
}

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Table sizes.
    pub sizes: &'static [u32],
    /// Backend counts.
    pub counts: &'static [u32],
    /// Build runs per case (the median is reported).
    pub build_runs: usize,
    /// Lookup runs per case, each over `lookups` flows.
    pub lookup_runs: usize,
    /// Lookups per run.
    pub lookups: usize,
    /// Stop adding build runs to a case after this long (at least 3 runs are made).
    pub case_budget: Duration,
}

impl Plan {
    /// The full benchmark (about a minute on a 2-core machine).
    pub const FULL: Self = Self {
        sizes: &[DEFAULT_TABLE_SIZE, LARGE_TABLE_SIZE],
        counts: &[10, 100, 1000],
        build_runs: 51,
        lookup_runs: 21,
        lookups: 1 << 20,
        case_budget: Duration::from_secs(4),
    };
    /// `--quick`: every case, fewer runs; well under 30 seconds.
    pub const QUICK: Self = Self {
        build_runs: 11,
        lookup_runs: 7,
        lookups: 1 << 18,
        case_budget: Duration::from_millis(1200),
        ..Self::FULL
    };

    fn cases(&self) -> impl Iterator<Item = (Implementation, u32, u32)> + '_ {
        self.sizes.iter().flat_map(move |&m| {
            self.counts.iter().flat_map(move |&n| {
                [Implementation::LbCore, Implementation::MaglevHash].map(|i| (i, m, n))
            })
        })
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Times `f` up to `runs` times (at least 3, fewer if `budget` runs out); median in ms.
fn time_runs(runs: usize, budget: Duration, mut f: impl FnMut()) -> (f64, usize) {
    let started = Instant::now();
    let mut times = Vec::with_capacity(runs);
    while times.len() < runs && (times.len() < 3 || started.elapsed() < budget) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let done = times.len();
    (median(times), done)
}

/// Median nanoseconds per call of `lookup`, over `plan.lookups` calls cycling through `flows`.
fn time_lookups(plan: &Plan, flows: &[FlowKey], mut lookup: impl FnMut(&FlowKey) -> u64) -> f64 {
    let passes = plan.lookups.div_ceil(flows.len()).max(1);
    let calls = passes * flows.len();
    let per_run: Vec<f64> = (0..plan.lookup_runs)
        .map(|_| {
            let t = Instant::now();
            let mut acc = 0u64;
            for _ in 0..passes {
                for f in flows {
                    acc = acc.wrapping_add(lookup(black_box(f)));
                }
            }
            black_box(acc);
            t.elapsed().as_secs_f64() * 1e9 / calls as f64
        })
        .collect();
    median(per_run)
}

fn measure(
    plan: &Plan,
    implementation: Implementation,
    m: u32,
    n: u32,
    flows: &[FlowKey],
) -> Result<CaseResult> {
    let input = backends(n);
    Ok(match implementation {
        Implementation::LbCore => {
            let mut builder = MaglevBuilder::default();
            let mut table = MaglevTable::default();
            builder.build_into(m, &input, &mut table)?; // warm the buffers
            let (build_ms_median, build_runs) =
                time_runs(plan.build_runs, plan.case_budget, || {
                    builder
                        .build_into(m, black_box(&input), &mut table)
                        .expect("validated above");
                });
            let lookup_ns_median = time_lookups(plan, flows, |f| {
                u64::from(table.lookup(f.hash()).unwrap_or(0))
            });
            let counts = table.slot_counts();
            let (lo, hi) = (
                counts.iter().min().copied().unwrap_or(0),
                counts.iter().max().copied().unwrap_or(0),
            );
            let mut without_one = MaglevTable::default();
            builder.build_into(m, &input[1..], &mut without_one)?;
            CaseResult {
                implementation,
                m,
                n,
                build_ms_median,
                lookup_ns_median,
                max_over_min: (lo > 0).then(|| f64::from(hi) / f64::from(lo)),
                disruption_remove_one: Some(table.diff(&without_one).moved_fraction),
                build_runs,
            }
        }
        Implementation::MaglevHash => {
            let ids: Vec<IpAddr> = input.iter().map(|b| b.id.0).collect();
            let (build_ms_median, build_runs) =
                time_runs(plan.build_runs, plan.case_budget, || {
                    black_box(maglev_hash::MaglevTable::with_capacity(
                        black_box(ids.clone()),
                        m as usize,
                    ));
                });
            let table = maglev_hash::MaglevTable::with_capacity(ids, m as usize);
            let lookup_ns_median = time_lookups(plan, flows, |f| match table.get(f) {
                Some(IpAddr::V4(a)) => u64::from(a.to_bits()),
                _ => 0,
            });
            CaseResult {
                implementation,
                m,
                n,
                build_ms_median,
                lookup_ns_median,
                max_over_min: None,
                disruption_remove_one: None,
                build_runs,
            }
        }
    })
}

/// Runs every case of `plan`, with a progress bar when stderr is a terminal.
pub fn run(plan: &Plan) -> Result<(Vec<CaseResult>, Summary)> {
    // 4096 flows, as in benches/maglev.rs: the keys stay in cache, as a just-received packet's
    // header would; the table slots are still read at random.
    let flows = flows(4096);
    let cases: Vec<_> = plan.cases().collect();
    let bar = ProgressBar::new(cases.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut results = Vec::with_capacity(cases.len());
    for (implementation, m, n) in cases {
        bar.set_message(format!("{implementation:?} M={m} N={n}"));
        results.push(measure(plan, implementation, m, n, &flows)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let pick = |i: Implementation, m: u32| {
        results
            .iter()
            .find(|r| r.implementation == i && r.m == m && r.n == 1000)
    };
    let ratio = |m: u32, f: fn(&CaseResult) -> f64| match (
        pick(Implementation::LbCore, m),
        pick(Implementation::MaglevHash, m),
    ) {
        (Some(a), Some(b)) => f(a) / f(b),
        _ => f64::NAN,
    };
    let summary = Summary {
        ratio_build_vs_maglev_hash: ratio(DEFAULT_TABLE_SIZE, |r| r.build_ms_median),
        ratio_build_vs_maglev_hash_large: ratio(LARGE_TABLE_SIZE, |r| r.build_ms_median),
        ratio_lookup_vs_maglev_hash: ratio(DEFAULT_TABLE_SIZE, |r| r.lookup_ns_median),
    };
    Ok((results, summary))
}

/// Writes the results as one JSON object per line, the summary last.
pub fn write_json(results: &[CaseResult], summary: &Summary, out: &mut dyn Write) -> Result<()> {
    for r in results {
        writeln!(out, "{}", serde_json::to_string(r)?)?;
    }
    writeln!(out, "{}", serde_json::to_string(summary)?)?;
    Ok(())
}

/// Writes the results as a table, the ratios underneath.
pub fn write_text(results: &[CaseResult], summary: &Summary, out: &mut dyn Write) -> Result<()> {
    let mut t = Table::new();
    t.load_style(UTF8_FULL_CONDENSED).set_header([
        "impl",
        "M",
        "N",
        "build ms (median)",
        "lookup ns (median)",
        "max/min slots",
        "moved, 1 of N removed",
        "ideal 1/N",
    ]);
    let opt = |x: Option<f64>, f: fn(f64) -> String| x.map_or_else(|| "-".to_owned(), f);
    for r in results {
        t.add_row([
            serde_json::to_value(r.implementation)?
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            r.m.to_string(),
            r.n.to_string(),
            format!("{:.3}", r.build_ms_median),
            format!("{:.2}", r.lookup_ns_median),
            opt(r.max_over_min, |x| format!("{x:.4}")),
            opt(r.disruption_remove_one, |x| format!("{:.2} %", 100.0 * x)),
            format!("{:.2} %", 100.0 / f64::from(r.n)),
        ]);
    }
    crate::table::right_align(&mut t, 1..8);
    writeln!(out, "{t}")?;
    writeln!(
        out,
        "build time, lb-core / maglev-hash, N=1000: {:.3} at M={DEFAULT_TABLE_SIZE}, {:.3} at M={LARGE_TABLE_SIZE}",
        summary.ratio_build_vs_maglev_hash, summary.ratio_build_vs_maglev_hash_large
    )?;
    writeln!(
        out,
        "lookup time, lb-core / maglev-hash, N=1000, M={DEFAULT_TABLE_SIZE}: {:.3}",
        summary.ratio_lookup_vs_maglev_hash
    )?;
    Ok(())
}
