//! The lookup-table benchmark (criterion): Maglev table build time and per-packet lookup cost,
//! this project's `lb_core::maglev` side by side with the `maglev-hash` crate on the same inputs.
//!
//! Run: `cargo bench --bench maglev` (all cases) or `cargo bench --bench maglev -- build/65537`.
//! The same measurements, with balance and disruption, for operators: `lb bench table`.

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use lb::bench::{backends, flows};
use lb_core::maglev::{DEFAULT_TABLE_SIZE, LARGE_TABLE_SIZE, MaglevBuilder, MaglevTable};

fn build(c: &mut Criterion) {
    for m in [DEFAULT_TABLE_SIZE, LARGE_TABLE_SIZE] {
        let mut group = c.benchmark_group(format!("build/{m}"));
        group.sample_size(if m == LARGE_TABLE_SIZE { 20 } else { 50 });
        for n in [10u32, 100, 1000] {
            let input = backends(n);
            let mut builder = MaglevBuilder::default();
            let mut table = MaglevTable::default();
            group.bench_with_input(BenchmarkId::new("lb-core", n), &input, |b, input| {
                b.iter(|| {
                    builder
                        .build_into(m, black_box(input), &mut table)
                        .expect("valid input");
                });
            });
            let ids: Vec<_> = input.iter().map(|b| b.id.0).collect();
            group.bench_with_input(BenchmarkId::new("maglev-hash", n), &ids, |b, ids| {
                b.iter_batched(
                    || ids.clone(),
                    |ids| maglev_hash::MaglevTable::with_capacity(ids, m as usize),
                    BatchSize::SmallInput,
                );
            });
        }
        group.finish();
    }
}

fn lookup(c: &mut Criterion) {
    const FLOWS: usize = 4096;
    let flows = flows(FLOWS);
    for m in [DEFAULT_TABLE_SIZE, LARGE_TABLE_SIZE] {
        let mut group = c.benchmark_group(format!("lookup/{m}"));
        group.throughput(Throughput::Elements(FLOWS as u64));
        let input = backends(1000);
        let table = MaglevTable::build(m, &input).expect("valid input");
        group.bench_function("lb-core (xxh3 5-tuple + table)", |b| {
            b.iter(|| {
                for f in &flows {
                    black_box(table.lookup(black_box(f).hash()));
                }
            });
        });
        let theirs = maglev_hash::MaglevTable::with_capacity(
            input.iter().map(|b| b.id.0).collect(),
            m as usize,
        );
        group.bench_function("maglev-hash (SipHash 5-tuple + table)", |b| {
            b.iter(|| {
                for f in &flows {
                    black_box(theirs.get(black_box(f)));
                }
            });
        });
        group.finish();
    }
}

criterion_group!(benches, build, lookup);
criterion_main!(benches);
