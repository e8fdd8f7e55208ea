//! Thousands of backends on one core: one engine, on the test's own thread, probes
//! [`DEFAULT_BACKENDS`] TCP listeners on 127.0.0.1 every second, and every probe must succeed within
//! two intervals. The CPU time of the engine's thread per round is measured and printed
//! (`cargo test -p lb-healthcheck --test scale -- --nocapture`).
//!
//! This file is its own test binary because it raises the process's file limit.

use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

use lb_healthcheck::{CheckConfig, CheckKind, Engine, EngineOptions, ProbeId, ProbeSpec};

/// Listeners, and so distinct probes; `LB_HC_SCALE_BACKENDS` (100..=15000) overrides it for a
/// manual measurement.
const DEFAULT_BACKENDS: usize = 2000;
const INTERVAL_MS: u32 = 1000;

/// Raises the soft limit of open files to at least `want` (bounded by the hard limit).
fn raise_nofile(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) };
    assert_eq!(got, 0, "getrlimit failed");
    if limit.rlim_cur >= want {
        return;
    }
    limit.rlim_cur = want.min(limit.rlim_max);
    // SAFETY: `limit` is a valid rlimit; setrlimit only reads it.
    let set = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) };
    assert_eq!(set, 0, "setrlimit failed");
    assert!(
        limit.rlim_cur >= want,
        "the hard limit of open files ({}) is below the {want} this test needs",
        limit.rlim_max
    );
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the duration of the call.
    let got = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &raw mut usage) };
    assert_eq!(got, 0, "getrusage failed");
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.unsigned_abs())
            + Duration::from_micros(t.tv_usec.unsigned_abs())
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[test]
fn thousands_of_tcp_backends_on_one_thread() {
    let backends = std::env::var("LB_HC_SCALE_BACKENDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(DEFAULT_BACKENDS, |n: usize| n.clamp(100, 15_000));
    // Listeners, plus one socket per probe in flight, plus slack.
    raise_nofile(2 * backends as u64 + 256);
    let listeners: Vec<TcpListener> = (0..backends)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
        .collect();
    let specs = listeners
        .iter()
        .map(|l| ProbeSpec {
            vip: "web".into(),
            backend: Ipv4Addr::LOCALHOST.into(),
            port: l.local_addr().unwrap().port(),
            check: CheckConfig {
                kind: CheckKind::Tcp,
                interval_ms: INTERVAL_MS,
                timeout_ms: 500,
                ..CheckConfig::default()
            },
        })
        .collect();
    let mut engine = Engine::new(specs, &EngineOptions::default()).unwrap();
    assert_eq!(engine.probe_count(), backends);

    let interval = Duration::from_millis(u64::from(INTERVAL_MS));
    let start = Instant::now();
    let cpu_start = thread_cpu();
    let mut first_success: Vec<Option<Duration>> = vec![None; backends];
    let mut failures = Vec::new();
    let mut max_in_flight = 0;
    let mut polls = 0u64;
    // Two intervals for every probe to report (the first start is within the first one),
    // then two more measured in steady state.
    let warm = start + 2 * interval;
    let mut steady: Option<(Instant, Duration, u64)> = None;
    let end = start + 4 * interval;
    let mut steady_results = 0u64;
    while Instant::now() < end {
        let round = engine.run_once(Duration::from_millis(100)).unwrap();
        polls += 1;
        max_in_flight = max_in_flight.max(engine.in_flight());
        for r in round.results {
            if r.success {
                first_success[r.probe.0].get_or_insert(r.at - start);
            } else {
                failures.push(r);
            }
            if steady.is_some() {
                steady_results += 1;
            }
        }
        assert!(round.transitions.is_empty(), "{:?}", round.transitions);
        if steady.is_none() && Instant::now() >= warm {
            let missing = first_success.iter().filter(|s| s.is_none()).count();
            assert_eq!(
                missing, 0,
                "{missing} of {backends} probes had no success within two intervals"
            );
            steady = Some((Instant::now(), thread_cpu(), polls));
        }
    }
    let (steady_start, steady_cpu, steady_polls) = steady.expect("the test ran past warm-up");
    let wall = steady_start.elapsed();
    let cpu = thread_cpu() - steady_cpu;
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..1]
    );
    let latest = first_success.iter().flatten().max().unwrap();
    let latencies: Vec<Duration> = (0..backends)
        .map(|i| engine.probe(ProbeId(i)).last.unwrap().latency)
        .collect();
    let max_latency = latencies.iter().max().unwrap();
    let rounds = wall.as_secs_f64() / interval.as_secs_f64();
    eprintln!(
        "scale: {backends} TCP probes every {INTERVAL_MS} ms on one thread: all succeeded by {latest:?}; \
         steady state {wall:?}: {steady_results} probes ({:.0}/s), {} polls, CPU {cpu:?} = {:.1}% of a core, \
         {:.2} ms CPU per round of {backends}, {:.1} µs per probe; max in flight {max_in_flight}, \
         max latency {max_latency:?}; whole run CPU {:?}",
        steady_results as f64 / wall.as_secs_f64(),
        polls - steady_polls,
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
        cpu.as_secs_f64() * 1000.0 / rounds,
        cpu.as_secs_f64() * 1e6 / steady_results.max(1) as f64,
        thread_cpu() - cpu_start,
    );
    // Every probe ran about once per interval in the steady state...
    let expected = rounds * backends as f64;
    assert!(
        (steady_results as f64) > 0.8 * expected,
        "{steady_results} results, expected about {expected:.0}"
    );
    // ...and one core had plenty of room (a loose bound: the machine is shared).
    assert!(
        cpu.as_secs_f64() < 0.5 * wall.as_secs_f64(),
        "the engine used {cpu:?} of CPU in {wall:?}"
    );
    drop(listeners);
}
