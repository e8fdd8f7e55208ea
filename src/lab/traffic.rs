//! The lab client's traffic: long-lived TCP connections ([`TcpLoad`]) and a sequenced UDP
//! stream ([`UdpStream`]), counting what the resilience experiments measure: established
//! connections broken, datagrams lost.
//!
//! Both only use sockets of the calling thread's network namespace (threads they start inherit
//! it): the lab runs them inside its client namespace through `Namespace::enter`.
//!
//! **TCP.** Each connection has its own thread: it connects (at most [`CONNECT_TIMEOUT`]), then
//! every `interval` sends [`REQUEST`] and reads the answer (at most [`RESPONSE_TIMEOUT`]), whose
//! body's first line is the name of the backend that answered ([`super::server`]). A
//! connection is *broken* when a send or read fails, times out, the answer is not a 200, or
//! the peer closes; it is never reopened, so `broken` counts established connections lost.
//! It is *switched* if a later answer names another backend than an earlier one, which a
//! healthy TCP connection cannot do (counted apart; the connection goes on).
//!
//! **UDP.** One thread sends datagrams at a steady rate, round-robin over `flows` sockets (one
//! source port each: distinct flows for ECMP and Maglev), and receives their echoes on the same
//! sockets (one mio poll). Each payload carries the stream's nonce, the flow id and a sequence
//! number (global over the stream); a bitmap over sequence numbers finds duplicates and what
//! never came back. If the sender falls behind schedule by more than [`MAX_LAG`] (a stalled
//! thread on a busy machine), it skips ahead instead of sending a burst, so a scheduling stall
//! sends less but never shows up as loss.
//!
//! **Invariants.** Bounded in count: at most [`MAX_CONNECTIONS`] connections, [`MAX_FLOWS`]
//! flows and [`MAX_DATAGRAMS`] sequence numbers (the bitmap's size, fixed at the start from
//! rate × `max`). Bounded in time: every socket operation has a timeout; a [`UdpStream`] stops
//! sending after its `max` duration by itself and ends its thread at most [`AUTO_DRAIN`] later; a
//! [`TcpLoad`] ends when stopped or dropped, and its memory does not grow while it runs.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::{Events, Interest, Poll, Token};

use super::server::{find, set_receive_buffer};

/// Most connections one [`TcpLoad`] opens.
pub const MAX_CONNECTIONS: usize = 10_000;

/// How long a connection may take to be established.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long sending a request and reading its whole answer may take.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// The request every connection sends every interval.
pub const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n";

/// One HTTP/1.0 `GET path` to `target` on a new connection (5 s to connect, 5 s to answer);
/// returns the body of a `200` answer, trimmed. Any other status is an error that carries the
/// status line and the body. For one-off requests (`lb lab get`, the SNAT experiment's
/// `/whoami`); the load generator is [`TcpLoad`].
pub fn http_get(target: SocketAddr, path: &str) -> io::Result<String> {
    let timeout = Duration::from_secs(5);
    let mut c = TcpStream::connect_timeout(&target, timeout)?;
    c.set_read_timeout(Some(timeout))?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: lab\r\n\r\n")?;
    let mut answer = String::new();
    c.read_to_string(&mut answer)?;
    let not_http = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{target}: not an HTTP answer: {answer:?}"),
        )
    };
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(not_http)?;
    let status_line = head.lines().next().unwrap_or_default();
    let code = status_line.split(' ').nth(1).ok_or_else(not_http)?;
    if code != "200" {
        return Err(io::Error::other(format!(
            "{target}{path}: {status_line}: {:?}",
            body.trim()
        )));
    }
    Ok(body.trim().to_owned())
}

/// Longest answer accepted (head and body); a longer one breaks the connection.
const MAX_ANSWER: usize = 16 * 1024;

/// Stack size of connection threads: they only hold a small buffer.
const WORKER_STACK: usize = 128 * 1024;

/// Most flows (source sockets) of one [`UdpStream`].
pub const MAX_FLOWS: u16 = 4096;

/// Most datagrams one [`UdpStream`] sends: rate × `max` must not exceed it (the bitmap of
/// sequence numbers received is 16 MiB then).
pub const MAX_DATAGRAMS: u64 = 1 << 27;

/// Size of every datagram's payload: magic, nonce, flow id, sequence number, padding.
pub const PAYLOAD_LEN: usize = 64;

/// How long a [`UdpStream`] that reached its `max` duration keeps receiving echoes.
pub const AUTO_DRAIN: Duration = Duration::from_secs(1);

/// A sender further behind schedule than this skips ahead instead of catching up in a burst.
pub const MAX_LAG: Duration = Duration::from_millis(50);

/// Magic at the start of every [`UdpStream`] payload.
const MAGIC: &[u8; 4] = b"LBUS";

/// Longest the UDP thread sleeps before it looks at its stop request again.
const UDP_TICK: Duration = Duration::from_millis(10);

/// Receive buffer asked for each flow's socket (best effort; see `set_receive_buffer`).
const UDP_RECEIVE_BUFFER: usize = 1 << 20;

/// A [`TcpLoad`]'s figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Connections established.
    pub opened: usize,
    /// Connections that could not be established (refused, timed out, …).
    pub failed_to_open: usize,
    /// Established connections not broken (so far, or, from [`TcpLoad::stop`], when stopped).
    pub open_now: usize,
    /// Established connections broken: a send or read failed or timed out, a non-200 answer,
    /// or the peer closed.
    pub broken: usize,
    /// Connections whose answers named more than one backend.
    pub switched: usize,
    /// Requests answered with a 200, over all connections.
    pub requests_ok: u64,
    /// Connections in `open_now` by the backend that last answered them (those not answered
    /// yet are in none).
    pub per_backend: BTreeMap<String, usize>,
    /// When the first connection broke.
    pub first_break: Option<Instant>,
    /// Why connections failed to open or broke, e.g. `"receive: closed by peer"`, with counts.
    pub errors: BTreeMap<String, usize>,
}

/// Where one connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    Open,
    Failed,
    Broken,
}

/// One connection's record.
#[derive(Clone, Debug)]
struct Connection {
    phase: Phase,
    backend: Option<String>,
    switched: bool,
}

/// Every connection's record and the totals, behind one lock.
#[derive(Debug)]
struct Board {
    connections: Vec<Connection>,
    requests_ok: u64,
    first_break: Option<Instant>,
    errors: BTreeMap<String, usize>,
}

impl Board {
    /// Records an answer from `backend` on connection `i`.
    fn answered(&mut self, i: usize, backend: &str) {
        self.requests_ok += 1;
        let connection = &mut self.connections[i];
        match &connection.backend {
            Some(before) if before == backend => {}
            Some(_) => {
                connection.switched = true;
                connection.backend = Some(backend.to_owned());
            }
            None => connection.backend = Some(backend.to_owned()),
        }
    }

    /// Records that connection `i` failed to open or broke.
    fn end(&mut self, i: usize, phase: Phase, why: String) {
        self.connections[i].phase = phase;
        if phase == Phase::Broken {
            self.first_break.get_or_insert_with(Instant::now);
        }
        *self.errors.entry(why).or_default() += 1;
    }

    fn stats(&self) -> TcpStats {
        let mut stats = TcpStats {
            requests_ok: self.requests_ok,
            first_break: self.first_break,
            errors: self.errors.clone(),
            ..TcpStats::default()
        };
        for connection in &self.connections {
            match connection.phase {
                Phase::Connecting => {}
                Phase::Failed => stats.failed_to_open += 1,
                Phase::Broken => {
                    stats.opened += 1;
                    stats.broken += 1;
                }
                Phase::Open => {
                    stats.opened += 1;
                    stats.open_now += 1;
                    if let Some(backend) = &connection.backend {
                        *stats.per_backend.entry(backend.clone()).or_default() += 1;
                    }
                }
            }
            stats.switched += usize::from(connection.switched);
        }
        stats
    }
}

/// What a [`TcpLoad`]'s threads share.
struct TcpShared {
    board: Mutex<Board>,
    stopping: Mutex<bool>,
    wake: Condvar,
}

impl TcpShared {
    fn board(&self) -> MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `until` or a stop request; true if stopping.
    fn wait_for_stop(&self, until: Instant) -> bool {
        let mut stopping = self.stopping.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if *stopping {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            stopping = self
                .wake
                .wait_timeout(stopping, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Long-lived HTTP connections to one address, each asking every interval which backend
/// serves it; see the [module docs](self).
pub struct TcpLoad {
    shared: Arc<TcpShared>,
    workers: Vec<JoinHandle<()>>,
}

impl TcpLoad {
    /// Opens `connections` connections to `target` (all at once, each on its own thread) and
    /// returns once each has connected and had its first answer, or failed (so within about
    /// [`CONNECT_TIMEOUT`] + [`RESPONSE_TIMEOUT`]). Connections that fail to open are counted,
    /// not retried. Their requests are spread evenly over `interval`.
    pub fn start(
        target: SocketAddr,
        connections: usize,
        interval: Duration,
    ) -> io::Result<TcpLoad> {
        if connections == 0 || connections > MAX_CONNECTIONS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("connections must be 1 to {MAX_CONNECTIONS}"),
            ));
        }
        if interval.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the interval must not be zero",
            ));
        }
        let initial = Connection {
            phase: Phase::Connecting,
            backend: None,
            switched: false,
        };
        let shared = Arc::new(TcpShared {
            board: Mutex::new(Board {
                connections: vec![initial; connections],
                requests_ok: 0,
                first_break: None,
                errors: BTreeMap::new(),
            }),
            stopping: Mutex::new(false),
            wake: Condvar::new(),
        });
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let mut workers = Vec::with_capacity(connections);
        for i in 0..connections {
            let phase = interval.mul_f64(i as f64 / connections as f64);
            let (worker_shared, ready) = (Arc::clone(&shared), ready_tx.clone());
            let spawned = thread::Builder::new()
                .name("lab-tcp-load".into())
                .stack_size(WORKER_STACK)
                .spawn(move || {
                    run_connection(i, target, interval, phase, &worker_shared, &ready);
                });
            match spawned {
                Ok(worker) => workers.push(worker),
                Err(e) => shared
                    .board()
                    .end(i, Phase::Failed, format!("thread: {}", e.kind())),
            }
        }
        drop(ready_tx);
        let deadline = Instant::now() + CONNECT_TIMEOUT + RESPONSE_TIMEOUT + Duration::from_secs(5);
        for _ in 0..workers.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if ready_rx.recv_timeout(left).is_err() {
                break;
            }
        }
        Ok(TcpLoad { shared, workers })
    }

    /// The figures now.
    pub fn snapshot(&self) -> TcpStats {
        self.shared.board().stats()
    }

    /// Stops: every connection finishes the exchange in hand (if any) and closes. Returns the
    /// figures as they were then: `open_now` counts the connections still healthy when
    /// stopped (which this closed), `per_backend` where they were.
    pub fn stop(mut self) -> TcpStats {
        self.finish();
        self.snapshot()
    }

    fn finish(&mut self) {
        *self
            .shared
            .stopping
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.shared.wake.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Drop for TcpLoad {
    fn drop(&mut self) {
        self.finish();
    }
}

/// One connection's life: connect, then an exchange every interval until it breaks or the
/// load stops. Sends on `ready` once, after connecting failed or the first exchange.
fn run_connection(
    i: usize,
    target: SocketAddr,
    interval: Duration,
    phase: Duration,
    shared: &TcpShared,
    ready: &mpsc::Sender<()>,
) {
    let connected = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).and_then(|stream| {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(RESPONSE_TIMEOUT))?;
        Ok(stream)
    });
    let mut stream = match connected {
        Ok(stream) => stream,
        Err(e) => {
            shared
                .board()
                .end(i, Phase::Failed, format!("connect: {}", e.kind()));
            let _ = ready.send(());
            return;
        }
    };
    shared.board().connections[i].phase = Phase::Open;
    let mut buf = Vec::with_capacity(512);
    let mut next = Instant::now();
    let mut first = true;
    loop {
        let outcome = exchange(&mut stream, &mut buf);
        let broken = match outcome {
            Ok(backend) => {
                shared.board().answered(i, &backend);
                false
            }
            Err(why) => {
                shared.board().end(i, Phase::Broken, why);
                true
            }
        };
        if first {
            let _ = ready.send(());
            first = false;
            next += phase;
        }
        if broken {
            return;
        }
        next += interval;
        next = next.max(Instant::now());
        if shared.wait_for_stop(next) {
            break;
        }
    }
    // Dropping the stream closes the connection with a FIN: everything sent was answered, so
    // nothing unread is left that would turn it into a reset.
    drop(stream);
}

/// Sends [`REQUEST`] and reads the answer; returns the first line of its body (the backend's
/// name), or why the connection is broken.
fn exchange(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<String, String> {
    let deadline = Instant::now() + RESPONSE_TIMEOUT;
    stream
        .write_all(REQUEST)
        .map_err(|e| format!("send: {}", error_kind(&e)))?;
    buf.clear();
    let head_end = loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            break end;
        }
        read_some(stream, buf, deadline)?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    if !(status.starts_with("HTTP/1.") && status.get(8..13) == Some(" 200 ")) {
        return Err(format!(
            "answer: status {}",
            status.get(9..12).unwrap_or("?")
        ));
    }
    let length: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .ok_or_else(|| "answer: no Content-Length".to_owned())?;
    let end = head_end + 4 + length;
    if end > MAX_ANSWER {
        return Err("answer: too long".to_owned());
    }
    while buf.len() < end {
        read_some(stream, buf, deadline)?;
    }
    if buf.len() > end {
        return Err("answer: more bytes than announced".to_owned());
    }
    let body = String::from_utf8_lossy(&buf[head_end + 4..end]);
    Ok(body.lines().next().unwrap_or("").to_owned())
}

/// Reads what arrives before `deadline` onto `buf`; an error if nothing does, or the peer
/// closed, or the answer grows past [`MAX_ANSWER`].
fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> Result<(), String> {
    if buf.len() > MAX_ANSWER {
        return Err("answer: too long".to_owned());
    }
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("receive: timed out".to_owned());
    }
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| format!("receive: {}", error_kind(&e)))?;
    let mut chunk = [0u8; 2048];
    match stream.read(&mut chunk) {
        Ok(0) => Err("receive: closed by peer".to_owned()),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(format!("receive: {}", error_kind(&e))),
    }
}

/// A short, bounded description of an I/O error (its kind; a receive timeout is "timed out").
fn error_kind(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out".to_owned(),
        kind => kind.to_string(),
    }
}

/// A [`UdpStream`]'s figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UdpStats {
    /// Datagrams sent (sequence numbers used, those whose send failed included).
    pub sent: u64,
    /// Distinct datagrams echoed back.
    pub received: u64,
    /// `sent - received`: from [`UdpStream::stop`], after the drain; from
    /// [`UdpStream::snapshot`], it includes the datagrams still in flight.
    pub lost: u64,
    /// Echoes received again after the first.
    pub duplicated: u64,
    /// Echoes received after a later one of the same flow.
    pub reordered: u64,
    /// `lost` per flow (index: flow id).
    pub per_flow_lost: Vec<u64>,
    /// Datagrams the local socket refused to send (counted in `sent` and so in `lost`).
    pub send_errors: u64,
    /// The longest run of consecutive sequence numbers lost: an outage of every flow lasted
    /// about `longest_gap / rate`.
    pub longest_gap: u64,
}

/// What the UDP thread records, behind one lock.
struct Tracker {
    flows: u64,
    /// Sequence numbers the stream may use: the bitmap's size.
    capacity: u64,
    /// One bit per sequence number: echo received.
    seen: Vec<u64>,
    sent: u64,
    send_errors: u64,
    received: u64,
    duplicated: u64,
    reordered: u64,
    /// Highest sequence number received per flow.
    highest: Vec<Option<u64>>,
    received_per_flow: Vec<u64>,
}

impl Tracker {
    fn new(flows: u16, capacity: u64) -> Tracker {
        let flows = usize::from(flows);
        Tracker {
            flows: flows as u64,
            capacity,
            seen: vec![0; capacity.div_ceil(64) as usize],
            sent: 0,
            send_errors: 0,
            received: 0,
            duplicated: 0,
            reordered: 0,
            highest: vec![None; flows],
            received_per_flow: vec![0; flows],
        }
    }

    /// Records the echo of datagram `seq` of `flow`; ignores impossible ones.
    fn record(&mut self, flow: u64, seq: u64) {
        if seq >= self.sent || flow >= self.flows || seq % self.flows != flow {
            return;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if self.seen[word] & (1 << bit) != 0 {
            self.duplicated += 1;
            return;
        }
        self.seen[word] |= 1 << bit;
        self.received += 1;
        let flow = flow as usize;
        self.received_per_flow[flow] += 1;
        match self.highest[flow] {
            Some(highest) if highest > seq => self.reordered += 1,
            _ => self.highest[flow] = Some(seq),
        }
    }

    /// Datagrams sent and not (yet) echoed.
    fn lost(&self) -> u64 {
        self.sent - self.received
    }

    fn stats(&self) -> UdpStats {
        let per_flow_lost = (0..self.flows)
            .map(|flow| {
                let sent = self.sent / self.flows + u64::from(flow < self.sent % self.flows);
                sent - self.received_per_flow[flow as usize]
            })
            .collect();
        UdpStats {
            sent: self.sent,
            received: self.received,
            lost: self.lost(),
            duplicated: self.duplicated,
            reordered: self.reordered,
            per_flow_lost,
            send_errors: self.send_errors,
            longest_gap: self.longest_gap(),
        }
    }

    /// The longest run of zero bits among the first `sent`.
    fn longest_gap(&self) -> u64 {
        let (mut longest, mut run) = (0u64, 0u64);
        for (i, &word) in self.seen.iter().enumerate() {
            let start = i as u64 * 64;
            if start >= self.sent {
                break;
            }
            let bits = (self.sent - start).min(64);
            if word == 0 {
                run += bits;
                continue;
            }
            for bit in 0..bits {
                if word & (1 << bit) == 0 {
                    run += 1;
                } else {
                    longest = longest.max(run);
                    run = 0;
                }
            }
        }
        longest.max(run)
    }
}

/// What the caller and a [`UdpStream`]'s thread share.
struct UdpShared {
    tracker: Mutex<Tracker>,
    /// Set by `stop`: stop sending, receive until then.
    stop: Mutex<Option<Instant>>,
}

impl UdpShared {
    fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A sequenced UDP stream to an echo, over several flows; see the [module docs](self).
pub struct UdpStream {
    shared: Arc<UdpShared>,
    thread: Option<JoinHandle<()>>,
    ports: Vec<u16>,
}

impl UdpStream {
    /// Binds `flows` sockets (ephemeral ports) and starts sending `rate_pps` datagrams per
    /// second in total to `target`, round-robin over them, receiving the echoes. Sending stops
    /// by itself after `max` (the thread ends [`AUTO_DRAIN`] later, or once every echo is
    /// back), or at [`stop`](Self::stop).
    ///
    /// Fails if `rate_pps`, `flows` or `max` is zero, `flows` exceeds [`MAX_FLOWS`], rate ×
    /// `max` exceeds [`MAX_DATAGRAMS`], or the sockets cannot be bound.
    pub fn start(
        target: SocketAddr,
        rate_pps: u32,
        flows: u16,
        max: Duration,
    ) -> io::Result<UdpStream> {
        let invalid = |what: String| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
        if rate_pps == 0 || max.is_zero() {
            return invalid("the rate and the duration must not be zero".into());
        }
        if flows == 0 || flows > MAX_FLOWS {
            return invalid(format!("flows must be 1 to {MAX_FLOWS}"));
        }
        let capacity = (f64::from(rate_pps) * max.as_secs_f64()).ceil() + 1.0;
        if capacity > MAX_DATAGRAMS as f64 {
            return invalid(format!("rate × duration exceeds {MAX_DATAGRAMS} datagrams"));
        }
        let capacity = capacity as u64;
        let unspecified: IpAddr = if target.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let poll = Poll::new()?;
        let mut sockets = Vec::with_capacity(usize::from(flows));
        let mut ports = Vec::with_capacity(usize::from(flows));
        for flow in 0..usize::from(flows) {
            let socket = UdpSocket::bind(SocketAddr::new(unspecified, 0))?;
            socket.set_nonblocking(true)?;
            set_receive_buffer(socket.as_raw_fd(), UDP_RECEIVE_BUFFER);
            ports.push(socket.local_addr()?.port());
            let mut socket = mio::net::UdpSocket::from_std(socket);
            poll.registry()
                .register(&mut socket, Token(flow), Interest::READABLE)?;
            sockets.push(socket);
        }
        let shared = Arc::new(UdpShared {
            tracker: Mutex::new(Tracker::new(flows, capacity)),
            stop: Mutex::new(None),
        });
        let sender = Sender {
            target,
            period: Duration::from_secs_f64(1.0 / f64::from(rate_pps)),
            max,
            nonce: nonce(),
        };
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("lab-udp-stream".into())
                .spawn(move || sender.run(poll, &sockets, &shared))?
        };
        Ok(UdpStream {
            shared,
            thread: Some(thread),
            ports,
        })
    }

    /// Each flow's source port (index: flow id).
    pub fn local_ports(&self) -> &[u16] {
        &self.ports
    }

    /// The figures now (`lost` includes the datagrams in flight).
    pub fn snapshot(&self) -> UdpStats {
        self.shared.tracker().stats()
    }

    /// Stops sending, keeps receiving echoes for `drain` (or until every datagram sent came
    /// back), then closes the sockets and returns the figures.
    pub fn stop(mut self, drain: Duration) -> UdpStats {
        self.finish(drain);
        self.snapshot()
    }

    fn finish(&mut self, drain: Duration) {
        *self
            .shared
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + drain);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.finish(Duration::ZERO);
    }
}

/// The UDP thread's settings.
struct Sender {
    target: SocketAddr,
    /// Time between two datagrams.
    period: Duration,
    max: Duration,
    nonce: u32,
}

impl Sender {
    /// Sends on schedule and receives until stopped (or `max` and [`AUTO_DRAIN`] are over).
    fn run(&self, mut poll: Poll, sockets: &[mio::net::UdpSocket], shared: &UdpShared) {
        let started = Instant::now();
        let (flows, capacity) = {
            let tracker = shared.tracker();
            (tracker.flows, tracker.capacity)
        };
        let mut events = Events::with_capacity(sockets.len().min(1024));
        let mut payload = [b'.'; PAYLOAD_LEN];
        payload[..4].copy_from_slice(MAGIC);
        payload[4..8].copy_from_slice(&self.nonce.to_be_bytes());
        let mut buf = [0u8; 2048];
        let mut next_send = started;
        let mut seq: u64 = 0;
        let mut sending = true;
        let mut auto_until = None;
        loop {
            let now = Instant::now();
            let requested = *shared.stop.lock().unwrap_or_else(PoisonError::into_inner);
            if requested.is_some() {
                sending = false;
            }
            if sending && (now >= started + self.max || seq >= capacity) {
                sending = false;
                auto_until = Some(now + AUTO_DRAIN);
            }
            if requested.or(auto_until).is_some_and(|until| now >= until) {
                break;
            }
            if !sending && shared.tracker().lost() == 0 {
                break; // nothing left to drain
            }
            if sending {
                if now.saturating_duration_since(next_send) > MAX_LAG {
                    next_send = now;
                }
                let mut errors = 0;
                let before = seq;
                while next_send <= now && seq < capacity {
                    let flow = seq % flows;
                    payload[8..10].copy_from_slice(&(flow as u16).to_be_bytes());
                    payload[10..18].copy_from_slice(&seq.to_be_bytes());
                    if sockets[flow as usize]
                        .send_to(&payload, self.target)
                        .is_err()
                    {
                        errors += 1;
                    }
                    seq += 1;
                    next_send += self.period;
                }
                if seq > before {
                    let mut tracker = shared.tracker();
                    tracker.sent = seq;
                    tracker.send_errors += errors;
                }
            }
            let wait = if sending {
                next_send.saturating_duration_since(Instant::now())
            } else {
                UDP_TICK
            };
            match poll.poll(&mut events, Some(wait.min(UDP_TICK))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "UDP stream poll failed");
                    thread::sleep(UDP_TICK);
                    continue;
                }
            }
            if events.is_empty() {
                continue;
            }
            let mut tracker = shared.tracker();
            for event in &events {
                let Some(socket) = sockets.get(event.token().0) else {
                    continue;
                };
                // Edge-triggered: read until the socket is empty.
                loop {
                    match socket.recv_from(&mut buf) {
                        Ok((len, _)) => {
                            if let Some((flow, seq)) = parse_payload(&buf[..len], self.nonce) {
                                tracker.record(flow, seq);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }
        }
    }
}

/// (flow, sequence number) of a payload of the stream with `nonce`, or None if it is not one.
fn parse_payload(payload: &[u8], nonce: u32) -> Option<(u64, u64)> {
    if payload.len() != PAYLOAD_LEN
        || &payload[..4] != MAGIC
        || payload[4..8] != nonce.to_be_bytes()
    {
        return None;
    }
    let flow = u16::from_be_bytes(payload[8..10].try_into().ok()?);
    let seq = u64::from_be_bytes(payload[10..18].try_into().ok()?);
    Some((u64::from(flow), seq))
}

/// A value that differs between streams (of this process and of others), so that a late echo
/// of an earlier stream that reached a reused port is not counted.
fn nonce() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    nanos
        ^ std::process::id().rotate_left(16)
        ^ SEQ
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::server::BackendServer;

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// Polls `done` every 10 ms for up to `timeout`; returns how long it took, if it did.
    fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if done() {
                return Some(started.elapsed());
            }
            thread::sleep(Duration::from_millis(10));
        }
        done().then(|| started.elapsed())
    }

    #[test]
    fn tcp_load_keeps_connections_and_counts_every_break() {
        let server = BackendServer::start("be1", local(), local()).unwrap();
        let load = TcpLoad::start(server.http_addr(), 300, Duration::from_millis(100)).unwrap();
        thread::sleep(Duration::from_secs(2));
        let running = load.snapshot();
        eprintln!("running: {running:?}");
        assert_eq!(running.opened, 300, "{running:?}");
        assert_eq!(running.failed_to_open, 0, "{running:?}");
        assert_eq!(running.open_now, 300, "{running:?}");
        assert_eq!(running.broken, 0, "{running:?}");
        assert_eq!(running.switched, 0, "{running:?}");
        assert_eq!(
            running.per_backend,
            BTreeMap::from([("be1".to_owned(), 300)])
        );
        // About 20 requests per connection in 2 s; a loaded machine may manage fewer.
        assert!(running.requests_ok >= 300 * 5, "{running:?}");
        assert_eq!(server.stats().http_connections_open, 300);

        let killed = Instant::now();
        drop(server);
        let took = wait_until(Duration::from_secs(5), || load.snapshot().broken == 300);
        let stopped = load.stop();
        eprintln!("after the server stopped ({took:?}): {stopped:?}");
        assert_eq!(stopped.broken, 300, "{stopped:?}");
        assert_eq!(stopped.open_now, 0, "{stopped:?}");
        assert!(stopped.per_backend.is_empty(), "{stopped:?}");
        assert!(took.unwrap() < Duration::from_secs(3));
        assert!(stopped.first_break.unwrap() >= killed);
    }

    #[test]
    fn tcp_load_stops_cleanly_and_counts_failures_to_open() {
        let server = BackendServer::start("be2", local(), local()).unwrap();
        let load = TcpLoad::start(server.http_addr(), 20, Duration::from_millis(50)).unwrap();
        assert_eq!(load.snapshot().per_backend.get("be2"), Some(&20));
        let stopped = load.stop();
        assert_eq!((stopped.open_now, stopped.broken), (20, 0), "{stopped:?}");
        let closed = wait_until(Duration::from_secs(5), || {
            server.stats().http_connections_open == 0
        });
        assert!(closed.is_some(), "{:?}", server.stats());

        // A port nobody listens on: refused at once.
        let nobody = std::net::TcpListener::bind(local()).unwrap();
        let target = nobody.local_addr().unwrap();
        drop(nobody);
        let load = TcpLoad::start(target, 5, Duration::from_millis(50)).unwrap();
        let failed = load.stop();
        assert_eq!((failed.opened, failed.failed_to_open), (0, 5), "{failed:?}");
        assert_eq!(failed.errors.get("connect: connection refused"), Some(&5));
    }

    #[test]
    fn udp_stream_loses_nothing_from_a_running_echo() {
        let server = BackendServer::start("be1", local(), local()).unwrap();
        let stream =
            UdpStream::start(server.udp_addr(), 2000, 16, Duration::from_secs(30)).unwrap();
        assert_eq!(stream.local_ports().len(), 16);
        thread::sleep(Duration::from_secs(2));
        let stats = stream.stop(Duration::from_secs(1));
        eprintln!("{stats:?}");
        assert!((3000..=4100).contains(&stats.sent), "{stats:?}");
        assert_eq!(stats.lost, 0, "{stats:?}");
        assert_eq!(stats.received, stats.sent);
        assert_eq!(
            (stats.duplicated, stats.reordered, stats.longest_gap),
            (0, 0, 0)
        );
        assert!(stats.per_flow_lost.iter().all(|&l| l == 0));
        assert_eq!(server.stats().udp_datagrams, stats.sent);
    }

    #[test]
    fn udp_stream_counts_what_a_stopped_echo_lost() {
        let server = BackendServer::start("be1", local(), local()).unwrap();
        let stream =
            UdpStream::start(server.udp_addr(), 2000, 16, Duration::from_secs(30)).unwrap();
        thread::sleep(Duration::from_secs(1));
        let before = stream.snapshot().sent;
        let echoed = server.stop().udp_datagrams;
        let after = stream.snapshot().sent;
        thread::sleep(Duration::from_secs(1));
        let stats = stream.stop(Duration::from_secs(1));
        eprintln!("echo stopped between {before} and {after} sent, {echoed} echoed: {stats:?}");
        // Exactly what the echo did not echo is lost: everything sent after it was gone, and
        // what it had not read yet when it stopped (at most a few hundred ms of traffic).
        assert_eq!(stats.received, echoed, "{stats:?}");
        assert!(stats.lost >= stats.sent - after, "{stats:?}");
        assert!(stats.lost <= stats.sent - before + 400, "{stats:?}");
        assert!(stats.lost > 1000, "{stats:?}");
        // Every flow lost its share; the outage covers the whole second half.
        assert!(stats.per_flow_lost.iter().all(|&l| l > 50), "{stats:?}");
        assert!(stats.longest_gap >= stats.sent - after, "{stats:?}");
    }

    #[test]
    fn udp_stream_stops_by_itself_after_its_max() {
        let server = BackendServer::start("be1", local(), local()).unwrap();
        let stream =
            UdpStream::start(server.udp_addr(), 1000, 4, Duration::from_millis(300)).unwrap();
        let finished = wait_until(Duration::from_secs(5), || {
            stream.thread.as_ref().is_some_and(JoinHandle::is_finished)
        });
        let stats = stream.snapshot();
        eprintln!("finished after {finished:?}: {stats:?}");
        assert!(finished.is_some());
        assert!((250..=302).contains(&stats.sent), "{stats:?}");
        assert_eq!(stats.lost, 0, "{stats:?}");
        assert!(UdpStream::start(server.udp_addr(), 0, 4, Duration::from_secs(1)).is_err());
        assert!(
            UdpStream::start(server.udp_addr(), 1_000_000, 4, Duration::from_secs(3600)).is_err()
        );
    }

    #[test]
    fn tracker_counts_duplicates_reordering_and_gaps() {
        let mut tracker = Tracker::new(2, 100);
        tracker.sent = 10;
        for seq in [0, 1, 3, 2, 3, 8, 9, 42] {
            tracker.record(seq % 2, seq);
        }
        tracker.record(0, 1); // wrong flow: ignored
        let stats = tracker.stats();
        assert_eq!(stats.received, 6);
        assert_eq!(stats.lost, 4);
        assert_eq!(stats.duplicated, 1);
        assert_eq!(stats.reordered, 0); // 2 (flow 0) came after 0 only
        assert_eq!(stats.per_flow_lost, vec![2, 2]);
        assert_eq!(stats.longest_gap, 4); // 4..=7
        tracker.record(0, 6); // flow 0 already had 8
        assert_eq!(tracker.stats().reordered, 1);
        assert_eq!(tracker.stats().longest_gap, 2); // 4..=5
    }
}
