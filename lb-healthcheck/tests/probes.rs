//! The engine against real sockets on 127.0.0.1: TCP listeners, HTTP responders, a UDP echo,
//! closed ports and a black-holed UDP port. No mocks: every result comes from the kernel.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use lb_healthcheck::engine::HealthEvent;
use lb_healthcheck::{
    CheckConfig, CheckKind, Engine, EngineOptions, ProbeError, ProbeId, ProbeResult, ProbeSpec,
    TargetId, Transition,
};

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

fn check(kind: CheckKind, interval_ms: u32, timeout_ms: u32) -> CheckConfig {
    CheckConfig {
        kind,
        interval_ms,
        timeout_ms,
        ..CheckConfig::default()
    }
}

fn spec(vip: &str, port: u16, check: CheckConfig) -> ProbeSpec {
    ProbeSpec {
        vip: vip.into(),
        backend: LOCALHOST.into(),
        port,
        check,
    }
}

fn http(path: &str, expect_status: u16) -> CheckKind {
    CheckKind::Http {
        path: path.into(),
        host: None,
        expect_status,
    }
}

/// A port nothing listens on (bound, then closed).
fn closed_tcp_port() -> u16 {
    TcpListener::bind((LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn closed_udp_port() -> u16 {
    UdpSocket::bind((LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Serves HTTP with `status` on a thread; returns its port and the requests it got.
fn http_responder(status: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            log.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&request).into_owned());
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            );
        }
    });
    (port, seen)
}

/// Accepts connections and never answers them.
fn silent_tcp() -> u16 {
    let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    port
}

/// Echoes every datagram back with a "pong:" prefix.
fn udp_echo() -> u16 {
    let socket = UdpSocket::bind((LOCALHOST, 0)).unwrap();
    let port = socket.local_addr().unwrap().port();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let mut reply = b"pong:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from);
        }
    });
    port
}

/// Runs the engine until every probe has ended at least `attempts` attempts, or `limit`.
fn run_until(
    engine: &mut Engine,
    attempts: u64,
    limit: Duration,
) -> (Vec<ProbeResult>, Vec<HealthEvent>) {
    let end = Instant::now() + limit;
    let mut results = Vec::new();
    let mut transitions = Vec::new();
    while Instant::now() < end {
        let round = engine.run_once(Duration::from_millis(50)).unwrap();
        results.extend(round.results);
        transitions.extend(round.transitions);
        let done = (0..engine.probe_count()).all(|i| {
            let p = engine.probe(ProbeId(i));
            p.successes + p.failures >= attempts
        });
        if done {
            break;
        }
    }
    (results, transitions)
}

fn first(results: &[ProbeResult], probe: usize) -> &ProbeResult {
    results
        .iter()
        .find(|r| r.probe == ProbeId(probe))
        .unwrap_or_else(|| panic!("probe {probe} has no result"))
}

#[test]
fn tcp_connect_succeeds_on_a_listener_and_is_refused_on_a_closed_port() {
    let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let open = listener.local_addr().unwrap().port();
    let closed = closed_tcp_port();
    let mut engine = Engine::new(
        vec![
            spec("web", open, check(CheckKind::Tcp, 200, 100)),
            spec("web", closed, check(CheckKind::Tcp, 200, 100)),
        ],
        &EngineOptions::default(),
    )
    .unwrap();
    let (results, _) = run_until(&mut engine, 2, Duration::from_secs(3));
    let ok = first(&results, 0);
    assert!(ok.success, "{ok:?}");
    assert_eq!(ok.error, None);
    let refused = first(&results, 1);
    assert!(!refused.success);
    assert_eq!(refused.error, Some(ProbeError::Refused));
    assert!(refused.latency < Duration::from_millis(100), "{refused:?}");
    let last = engine.probe(ProbeId(0)).last.unwrap();
    assert!(last.success);
    assert!(last.latency < Duration::from_millis(100));
}

#[test]
fn http_checks_read_the_status() {
    let (ok_port, ok_requests) = http_responder("200 OK");
    let (down_port, _) = http_responder("503 Service Unavailable");
    let mut engine = Engine::new(
        vec![
            spec("web", ok_port, check(http("/healthz", 200), 200, 150)),
            spec("web", down_port, check(http("/", 200), 200, 150)),
            // The same 503 responder, where 503 is what the operator expects.
            spec("maint", down_port, check(http("/", 503), 200, 150)),
            // A listener that never answers: the timeout covers the whole exchange.
            spec("web", silent_tcp(), check(http("/", 200), 200, 150)),
            spec("web", closed_tcp_port(), check(http("/", 200), 200, 150)),
        ],
        &EngineOptions::default(),
    )
    .unwrap();
    assert_eq!(engine.probe_count(), 5);
    let (results, _) = run_until(&mut engine, 2, Duration::from_secs(3));
    assert!(first(&results, 0).success, "{:?}", first(&results, 0));
    assert_eq!(first(&results, 1).error, Some(ProbeError::HttpStatus(503)));
    assert!(first(&results, 2).success, "{:?}", first(&results, 2));
    let silent = first(&results, 3);
    assert_eq!(silent.error, Some(ProbeError::Timeout));
    assert!(silent.latency >= Duration::from_millis(150), "{silent:?}");
    assert_eq!(first(&results, 4).error, Some(ProbeError::Refused));
    let request = ok_requests.lock().unwrap()[0].clone();
    assert!(
        request.starts_with("GET /healthz HTTP/1.1\r\n"),
        "{request:?}"
    );
    assert!(
        request.contains(&format!("\r\nHost: 127.0.0.1:{ok_port}\r\n")),
        "{request:?}"
    );
}

#[test]
fn udp_checks_want_the_expected_reply() {
    let echo = udp_echo();
    let black_hole = UdpSocket::bind((LOCALHOST, 0)).unwrap(); // bound, never read
    let hole = black_hole.local_addr().unwrap().port();
    let udp = |send: &str, expect: &str| CheckKind::Udp {
        send: send.into(),
        expect: expect.into(),
    };
    let mut engine = Engine::new(
        vec![
            spec("dns", echo, check(udp("ping", "pong:ping"), 300, 200)),
            spec("dns", echo, check(udp("ping", "nope"), 300, 200)),
            spec("dns", echo, check(udp("ping", ""), 300, 200)),
            spec("dns", closed_udp_port(), check(udp("ping", ""), 300, 200)),
            spec("dns", hole, check(udp("ping", ""), 300, 200)),
        ],
        &EngineOptions::default(),
    )
    .unwrap();
    let (results, _) = run_until(&mut engine, 2, Duration::from_secs(3));
    assert!(first(&results, 0).success, "{:?}", first(&results, 0));
    assert_eq!(first(&results, 1).error, Some(ProbeError::UnexpectedReply));
    assert!(first(&results, 2).success);
    let unreachable = first(&results, 3);
    assert_eq!(unreachable.error, Some(ProbeError::Refused));
    assert!(unreachable.latency < Duration::from_millis(100));
    let timed_out = first(&results, 4);
    assert_eq!(timed_out.error, Some(ProbeError::Timeout));
    // The timeout is honoured: not early, and not much late.
    assert!(
        timed_out.latency >= Duration::from_millis(200),
        "{timed_out:?}"
    );
    assert!(
        timed_out.latency < Duration::from_millis(400),
        "{timed_out:?}"
    );
    drop(black_hole);
}

#[test]
fn interval_is_kept_with_jitter() {
    let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut engine = Engine::new(
        vec![spec("web", port, check(CheckKind::Tcp, 200, 100))],
        &EngineOptions::default(),
    )
    .unwrap();
    let (results, _) = run_until(&mut engine, 6, Duration::from_secs(4));
    assert_eq!(results.len(), 6);
    for pair in results.windows(2) {
        let gap = pair[1].at.duration_since(pair[0].at);
        // 200 ms ± 10 % jitter, plus scheduling slack on a busy machine.
        assert!(
            gap >= Duration::from_millis(170) && gap <= Duration::from_millis(450),
            "{gap:?}"
        );
    }
}

#[test]
fn a_dead_backend_falls_and_a_revived_one_rises_on_every_target_sharing_the_probe() {
    let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let c = CheckConfig {
        rise: 2,
        fall: 3,
        ..check(CheckKind::Tcp, 100, 50)
    };
    let mut engine = Engine::new(
        vec![spec("a", port, c.clone()), spec("b", port, c)],
        &EngineOptions::default(),
    )
    .unwrap();
    assert_eq!(engine.probe_count(), 1);
    let (_, transitions) = run_until(&mut engine, 3, Duration::from_secs(2));
    assert_eq!(transitions, []);

    drop(listener);
    let before = engine.probe(ProbeId(0)).failures;
    let (results, transitions) = run_until(&mut engine, 3 + 3, Duration::from_secs(3));
    let failures = engine.probe(ProbeId(0)).failures - before;
    assert_eq!(failures, 3, "{results:?}");
    let down: Vec<_> = transitions
        .iter()
        .map(|e| (e.target, e.vip.as_str(), e.transition))
        .collect();
    assert_eq!(
        down,
        [
            (TargetId(0), "a", Transition::Down),
            (TargetId(1), "b", Transition::Down)
        ]
    );
    assert!(!engine.target(TargetId(0)).healthy);

    let _listener = TcpListener::bind((LOCALHOST, port)).unwrap();
    let (_, transitions) = run_until(&mut engine, 6 + 2, Duration::from_secs(3));
    assert_eq!(transitions.len(), 2, "{transitions:?}");
    assert!(transitions.iter().all(|e| e.transition == Transition::Up));
    let t = engine.target(TargetId(1));
    assert!(t.healthy);
    assert_eq!(t.transitions, 2);
    assert_eq!(
        engine.probe(ProbeId(0)).addr,
        SocketAddr::new(LOCALHOST.into(), port)
    );
}

#[test]
fn a_short_outage_is_damped() {
    // A listener that disappears for about one probe (fall 3): the targets stay healthy.
    let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut engine = Engine::new(
        vec![spec("a", port, check(CheckKind::Tcp, 100, 50))],
        &EngineOptions::default(),
    )
    .unwrap();
    run_until(&mut engine, 2, Duration::from_secs(2));
    drop(listener);
    let (_, t1) = run_until(&mut engine, 3, Duration::from_secs(2));
    let _listener = TcpListener::bind((LOCALHOST, port)).unwrap();
    let (_, t2) = run_until(&mut engine, 6, Duration::from_secs(2));
    assert_eq!(engine.probe(ProbeId(0)).failures, 1);
    assert!(t1.is_empty() && t2.is_empty());
    assert!(engine.target(TargetId(0)).healthy);
}

#[test]
fn unhealthy_start_rises_after_rise_successes() {
    let listener = TcpListener::bind((LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let options = EngineOptions {
        checker: "node-a".into(),
        initially_healthy: false,
    };
    let mut engine = Engine::new(
        vec![spec("a", port, check(CheckKind::Tcp, 100, 50))],
        &options,
    )
    .unwrap();
    let (_, transitions) = run_until(&mut engine, 1, Duration::from_secs(2));
    assert!(transitions.is_empty());
    let (_, transitions) = run_until(&mut engine, 2, Duration::from_secs(2));
    assert_eq!(transitions.len(), 1);
    assert_eq!(transitions[0].transition, Transition::Up);
}
