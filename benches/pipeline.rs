//! The packet-pipeline benchmark (criterion): the whole forwarding decision
//! (`lb_core::forward::process`: parse, VIP match, connection table, Maglev lookup, IP-in-IP
//! encapsulation into a buffer) on 64-byte Ethernet frames carrying TCP, with 10 000 and
//! 1 000 000 active flows. Reported as packets per second on one core.
//!
//! Run: `cargo bench --bench pipeline`.
//!
//! A third case, `golden-table`, runs every row of the golden packet table (`lb_core::golden`:
//! encapsulations, SNAT return traffic, an ICMP answer, frames for the host and one frame per
//! drop reason) in turn, so that the checks a malformed or hostile frame meets are measured on
//! the same inputs the tests pin.
//!
//! Each flow count is measured twice: frame by frame with `process`, and in batches of 64 with
//! `process_batch` (as a mux worker gets them from a TPACKET_V3 block), which overlaps the
//! connection-table cache misses of a batch.
//!
//! The frames are generated once, one per flow, and processed in flow order, cycling. The
//! warm-up makes every flow tracked and trusted, as established connections are: three packets
//! of each flow, then a fourth a second later (a flow is trusted at its third packet at least
//! `trust_after` after its first). With
//! 1 000 000 flows the connection table (2^22 slots, 240 MB) and the frames (64 MB) are far larger
//! than the caches, so most lookups miss them, as under real load.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use etherparse::PacketBuilder;
use lb_core::config::Config;
use lb_core::conntrack::{ConnTable, ConnTableConfig};
use lb_core::forward::{Action, WorkerState, process, process_batch};
use lb_core::golden;
use lb_core::packet::Link;
use lb_core::snapshot::Snapshot;

const CONFIG: &str = r#"
    [node]
    address_v4 = "198.18.11.2"
    mtu = 1600
    [[vip]]
    name = "web"
    address = "198.18.100.1"
    protocol = "tcp"
    port = 80
    encap = "ipip"
"#;

/// A 64-byte Ethernet frame: 14 + 20 (IPv4) + 20 (TCP) + 10 bytes of payload.
fn frame(flow: u32) -> Vec<u8> {
    // Unique per flow: 50 000 source ports per client address, clients from 198.18.0.0.
    let client = (0xc612_0000u32 + flow / 50_000).to_be_bytes();
    let port = 1024 + (flow % 50_000) as u16;
    let mut out = Vec::with_capacity(64);
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(client, [198, 18, 100, 1], 64)
        .tcp(port, 80, flow, 65535)
        .ack(1)
        .write(&mut out, &[0x5a; 10])
        .expect("writing to a Vec");
    assert_eq!(out.len(), 64);
    out
}

fn snapshot() -> Snapshot {
    let mut text = CONFIG.to_owned();
    for i in 0..10 {
        text.push_str(&format!("[[vip.backend]]\naddress = \"198.18.2{i}.2\"\n"));
    }
    Snapshot::compile(&Config::from_toml(&text, "bench").expect("valid"), 1).expect("tables build")
}

fn pipeline(c: &mut Criterion) {
    let snapshot = snapshot();
    let mut group = c.benchmark_group("pipeline");
    for flows in [10_000u32, 1_000_000] {
        let frames: Vec<Vec<u8>> = (0..flows).map(frame).collect();
        // 4x the flows: few buckets draw more than their 8 slots.
        let capacity = (flows as usize * 4).next_power_of_two();
        let mut state = WorkerState::new(ConnTable::new(ConnTableConfig {
            capacity,
            ..ConnTableConfig::default()
        }));
        let mut out = vec![0u8; 2048];
        let start = 1_000_000_000;
        // Flow by flow, so that no flow waits as a new entry (at most 2 of a bucket's 8 slots).
        for f in &frames {
            for _ in 0..3 {
                process(f, Link::Ethernet, &snapshot, &mut state, start, &mut out);
            }
        }
        let now = start + 1_000_000_000;
        for f in &frames {
            process(f, Link::Ethernet, &snapshot, &mut state, now, &mut out);
        }
        // 8-way buckets: the few buckets that draw more than 8 flows (a Poisson tail, about
        // 0.02 % of flows at 1M) leave those flows to the Maglev table alone.
        let occupancy = state.conntrack.occupancy();
        assert!(
            occupancy.trusted as f64 >= 0.999 * f64::from(flows),
            "flows tracked and trusted: {occupancy:?}"
        );
        const BATCH: usize = 10_000;
        group.throughput(Throughput::Elements(BATCH as u64));
        let mut next = 0usize;
        group.bench_with_input(
            BenchmarkId::new("64B-tcp-flows", flows),
            &frames,
            |b, frames| {
                b.iter(|| {
                    for _ in 0..BATCH {
                        let action = process(
                            &frames[next],
                            Link::Ethernet,
                            &snapshot,
                            &mut state,
                            now,
                            &mut out,
                        );
                        debug_assert!(matches!(action, Action::Encap { .. }));
                        black_box(action);
                        next += 1;
                        if next == frames.len() {
                            next = 0;
                        }
                    }
                });
            },
        );
        // The same frames in batches of 64, each with its own output buffer.
        const FRAMES_PER_BATCH: usize = 64;
        let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let mut bufs = vec![vec![0u8; 2048]; FRAMES_PER_BATCH];
        let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
        let mut actions = [Action::Pass; FRAMES_PER_BATCH];
        group.bench_with_input(
            BenchmarkId::new("64B-tcp-flows-batch64", flows),
            &refs,
            |b, refs| {
                b.iter(|| {
                    let mut done = 0;
                    while done < BATCH {
                        let take = FRAMES_PER_BATCH.min(BATCH - done).min(refs.len() - next);
                        let n = process_batch(
                            &refs[next..next + take],
                            Link::Ethernet,
                            &snapshot,
                            &mut state,
                            now,
                            &mut outs[..take],
                            &mut actions[..take],
                        );
                        debug_assert!(
                            actions[..n]
                                .iter()
                                .all(|a| matches!(a, Action::Encap { .. }))
                        );
                        black_box(&actions);
                        done += n;
                        next += n;
                        if next == refs.len() {
                            next = 0;
                        }
                    }
                });
            },
        );
        assert_eq!(
            state.counters.encapsulated, state.counters.packets,
            "every packet encapsulated"
        );
    }
    let golden_snapshot = golden::snapshot();
    let rows = golden::table();
    let mut state = golden::worker();
    let mut out = vec![0u8; 65535 + 48];
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.bench_function("golden-table", |b| {
        b.iter(|| {
            for row in &rows {
                black_box(process(
                    &row.input,
                    row.link,
                    &golden_snapshot,
                    &mut state,
                    1_000_000_000,
                    &mut out,
                ));
            }
        });
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
