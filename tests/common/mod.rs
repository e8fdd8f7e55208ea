//! Support for integration tests that run in network namespaces (`lb::netns`).
//!
//! - [`EncapCapture`]: what a backend receives encapsulated (IP-in-IP, GRE, IPv6-in-IPv4),
//!   decoded by etherparse, a parser independent of the project's own encapsulation code.
//! - [`udp_flows`] and [`UdpSink`]: bounded UDP traffic from many flows, and its receiver.
//!
//! Every sender here is bounded in packets; every receiver in time.

#![allow(
    dead_code,
    reason = "each test file uses its own subset of this module"
)]

use std::io;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etherparse::{Ipv4Slice, NetSlice, SlicedPacket, TransportSlice};
use std::process::Command;

use lb::netns::{Lab, Namespace};

/// The outer protocols [`EncapCapture`] listens to: IP-in-IP, GRE, IPv6-in-IPv4.
pub const ENCAP_PROTOCOLS: [u8; 3] = [4, 47, 41];

/// A GRE header (RFC 2784 with the RFC 2890 key and sequence number extensions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gre {
    /// The protocol type (EtherType) of the payload: 0x0800 IPv4, 0x86DD IPv6.
    pub protocol: u16,
    /// The key, if the K bit is set.
    pub key: Option<u32>,
    /// The sequence number, if the S bit is set.
    pub sequence: Option<u32>,
    /// Whether the GRE checksum is right, if the C bit is set.
    pub checksum_ok: Option<bool>,
}

/// The packet inside the encapsulation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inner {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol of the payload (6 TCP, 17 UDP, …).
    pub protocol: u8,
    /// Source port (TCP and UDP only).
    pub src_port: Option<u16>,
    /// Destination port (TCP and UDP only).
    pub dst_port: Option<u16>,
    /// The transport payload (for TCP and UDP), else the IP payload.
    pub payload: Vec<u8>,
}

/// One encapsulated packet a backend received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    /// Outer source address (the mux).
    pub outer_src: Ipv4Addr,
    /// Outer destination address (the backend).
    pub outer_dst: Ipv4Addr,
    /// Outer IP protocol: 4, 47 or 41.
    pub outer_protocol: u8,
    /// Whether the outer IPv4 header checksum is right.
    pub outer_checksum_ok: bool,
    /// The GRE header, for protocol 47.
    pub gre: Option<Gre>,
    /// The decoded inner packet, or why it could not be decoded.
    pub inner: Result<Inner, String>,
    /// The whole packet as received, outer IPv4 header included.
    pub raw: Vec<u8>,
}

/// Decodes one packet as a raw IPv4 socket delivers it (outer IPv4 header first).
pub fn decode(raw: &[u8]) -> Captured {
    let mut captured = Captured {
        outer_src: Ipv4Addr::UNSPECIFIED,
        outer_dst: Ipv4Addr::UNSPECIFIED,
        outer_protocol: 0,
        outer_checksum_ok: false,
        gre: None,
        inner: Err("not decoded".to_owned()),
        raw: raw.to_vec(),
    };
    let outer = match Ipv4Slice::from_slice(raw) {
        Ok(outer) => outer,
        Err(e) => {
            captured.inner = Err(format!("outer IPv4: {e}"));
            return captured;
        }
    };
    let header = outer.header();
    captured.outer_src = header.source_addr();
    captured.outer_dst = header.destination_addr();
    captured.outer_protocol = header.protocol().0;
    captured.outer_checksum_ok =
        header.to_header().calc_header_checksum() == header.header_checksum();
    let payload = outer.payload().payload;
    captured.inner = match captured.outer_protocol {
        4 | 41 => decode_inner(payload),
        47 => match decode_gre(payload) {
            Ok((gre, rest)) => {
                let inner = match gre.protocol {
                    0x0800 | 0x86dd => decode_inner(rest),
                    other => Err(format!("GRE protocol type {other:#06x}")),
                };
                captured.gre = Some(gre);
                inner
            }
            Err(e) => Err(e),
        },
        other => Err(format!("outer protocol {other}")),
    };
    captured
}

/// Splits a GRE packet into its header and payload.
fn decode_gre(packet: &[u8]) -> Result<(Gre, &[u8]), String> {
    const C: u16 = 0x8000;
    const K: u16 = 0x2000;
    const S: u16 = 0x1000;
    let word16 = |at: usize| -> Result<u16, String> {
        packet
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("GRE header truncated at byte {at}"))
    };
    let word32 = |at: usize| -> Result<u32, String> {
        packet
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("GRE header truncated at byte {at}"))
    };
    let flags = word16(0)?;
    if flags & 0x7 != 0 {
        return Err(format!("GRE version {}", flags & 0x7));
    }
    if flags & 0x4ff8 != 0 {
        return Err(format!("GRE reserved flags set: {flags:#06x}"));
    }
    let protocol = word16(2)?;
    let mut at = 4;
    let mut checksum_ok = None;
    if flags & C != 0 {
        word32(at)?;
        checksum_ok = Some(internet_checksum(packet) == 0);
        at += 4;
    }
    let mut key = None;
    if flags & K != 0 {
        key = Some(word32(at)?);
        at += 4;
    }
    let mut sequence = None;
    if flags & S != 0 {
        sequence = Some(word32(at)?);
        at += 4;
    }
    let gre = Gre {
        protocol,
        key,
        sequence,
        checksum_ok,
    };
    Ok((gre, &packet[at..]))
}

/// The ones' complement of the ones' complement sum of `bytes` (0 over data that includes a
/// correct checksum).
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], chunk.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Decodes an inner IPv4 or IPv6 packet with etherparse.
fn decode_inner(packet: &[u8]) -> Result<Inner, String> {
    let sliced = SlicedPacket::from_ip(packet).map_err(|e| format!("inner packet: {e}"))?;
    let (src, dst, protocol, ip_payload) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => (
            IpAddr::V4(ip.header().source_addr()),
            IpAddr::V4(ip.header().destination_addr()),
            ip.payload_ip_number().0,
            ip.payload().payload,
        ),
        Some(NetSlice::Ipv6(ip)) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
            ip.payload().ip_number.0,
            ip.payload().payload,
        ),
        _ => return Err("inner packet is not IP".to_owned()),
    };
    let (src_port, dst_port, payload) = match &sliced.transport {
        Some(TransportSlice::Udp(udp)) => (
            Some(udp.source_port()),
            Some(udp.destination_port()),
            udp.payload(),
        ),
        Some(TransportSlice::Tcp(tcp)) => (
            Some(tcp.source_port()),
            Some(tcp.destination_port()),
            tcp.payload(),
        ),
        _ => (None, None, ip_payload),
    };
    Ok(Inner {
        src,
        dst,
        protocol,
        src_port,
        dst_port,
        payload: payload.to_vec(),
    })
}

/// Opens a raw IPv4 socket for IP protocol `protocol`.
fn raw_socket(protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket takes plain integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly opened descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // A large receive buffer: a capture thread starved by a busy machine must not lose
    // packets (that would read as the load balancer's loss).
    let size: libc::c_int = 16 << 20;
    // SAFETY: setsockopt reads `size` (a c_int of the given length) during the call.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    Ok(fd)
}

/// Captures encapsulated packets arriving in a namespace, on raw sockets for protocols 4, 47
/// and 41, until stopped. Holding the sockets open also stops the kernel's ICMP "protocol
/// unreachable" replies for them.
pub struct EncapCapture {
    stop: Arc<AtomicBool>,
    packets: Arc<Mutex<Vec<Captured>>>,
    thread: Option<JoinHandle<()>>,
}

impl EncapCapture {
    /// Starts capturing in `ns`; returns once the sockets are open. Panics if they cannot be.
    pub fn start(ns: &Namespace) -> EncapCapture {
        let stop = Arc::new(AtomicBool::new(false));
        let packets = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let thread = {
            let stop = Arc::clone(&stop);
            let packets = Arc::clone(&packets);
            ns.enter(move || {
                let sockets = match ENCAP_PROTOCOLS
                    .iter()
                    .map(|&p| raw_socket(i32::from(p)))
                    .collect::<io::Result<Vec<_>>>()
                {
                    Ok(sockets) => {
                        let _ = ready_tx.send(Ok(()));
                        sockets
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                capture_loop(&sockets, &stop, &packets);
            })
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("EncapCapture in {ns}: cannot open raw sockets: {e}"),
            Err(e) => panic!("EncapCapture in {ns}: capture thread did not start: {e}"),
        }
        EncapCapture {
            stop,
            packets,
            thread: Some(thread),
        }
    }

    /// The packets captured so far.
    pub fn packets(&self) -> Vec<Captured> {
        self.packets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits up to `timeout` until at least `n` packets were captured; returns those so far.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Captured> {
        let deadline = Instant::now() + timeout;
        loop {
            let packets = self.packets();
            if packets.len() >= n || Instant::now() >= deadline {
                return packets;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops capturing, closes the sockets and returns every packet captured.
    pub fn stop(mut self) -> Vec<Captured> {
        self.finish();
        self.packets()
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
            && !std::thread::panicking()
        {
            panic!("EncapCapture thread panicked");
        }
    }
}

impl Drop for EncapCapture {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Polls the sockets every 50 ms until `stop`; decodes every packet into `out`.
fn capture_loop(sockets: &[OwnedFd], stop: &AtomicBool, out: &Mutex<Vec<Captured>>) {
    let mut buf = vec![0u8; 65536];
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        if n <= 0 {
            continue;
        }
        for pfd in &mut fds {
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            pfd.revents = 0;
            loop {
                // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call;
                // `pfd.fd` is one of our open sockets.
                let len = unsafe {
                    libc::recv(
                        pfd.fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                let Ok(len) = usize::try_from(len) else {
                    break; // EAGAIN: drained
                };
                let packet = decode(&buf[..len]);
                out.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(packet);
            }
        }
    }
}

/// Magic at the start of every [`udp_flows`] payload.
pub const FLOW_MAGIC: &[u8; 4] = b"LBTF";

/// A [`udp_flows`] payload: magic, flow id and sequence number (big-endian u32s).
pub fn flow_payload(flow: u32, seq: u32) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[..4].copy_from_slice(FLOW_MAGIC);
    p[4..8].copy_from_slice(&flow.to_be_bytes());
    p[8..].copy_from_slice(&seq.to_be_bytes());
    p
}

/// Reads back (flow id, sequence number) from a [`udp_flows`] payload.
pub fn parse_flow_payload(payload: &[u8]) -> Option<(u32, u32)> {
    if payload.len() != 12 || &payload[..4] != FLOW_MAGIC {
        return None;
    }
    let flow = u32::from_be_bytes(payload[4..8].try_into().ok()?);
    let seq = u32::from_be_bytes(payload[8..].try_into().ok()?);
    Some((flow, seq))
}

/// Sends `packets_per_flow` datagrams on each of `flows` UDP flows from namespace `ns` to
/// `dst:port`: one socket per flow (distinct source ports), round-robin over the flows, the
/// payload being [`flow_payload`]. Returns each flow's source port (index = flow id).
///
/// Bounded: at most 4096 flows and 1000 packets per flow.
pub fn udp_flows(
    ns: &Namespace,
    dst: Ipv4Addr,
    port: u16,
    flows: u32,
    packets_per_flow: u32,
) -> io::Result<Vec<u16>> {
    assert!(
        flows <= 4096 && packets_per_flow <= 1000,
        "udp_flows is bounded"
    );
    let to = SocketAddrV4::new(dst, port);
    ns.enter(move || {
        let sockets = (0..flows)
            .map(|_| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
            .collect::<io::Result<Vec<_>>>()?;
        for seq in 0..packets_per_flow {
            for (flow, socket) in (0u32..).zip(&sockets) {
                socket.send_to(&flow_payload(flow, seq), to)?;
            }
        }
        sockets
            .iter()
            .map(|s| s.local_addr().map(|a| a.port()))
            .collect()
    })
    .join()
    .map_err(|_| io::Error::other("udp_flows thread panicked"))?
}

/// A received datagram: sender and payload.
pub type Datagram = (SocketAddr, Vec<u8>);

/// A UDP socket bound in a namespace, collecting datagrams on a thread.
pub struct UdpSink {
    handle: JoinHandle<io::Result<Vec<Datagram>>>,
}

impl UdpSink {
    /// Binds `addr` in `ns` (returns once bound) and collects datagrams until `expect` have
    /// arrived or `timeout` has passed.
    pub fn start(ns: &Namespace, addr: SocketAddrV4, expect: usize, timeout: Duration) -> UdpSink {
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let handle = ns.enter(move || {
            let socket = match UdpSocket::bind(addr) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
            };
            let deadline = Instant::now() + timeout;
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while got.len() < expect {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                socket.set_read_timeout(Some(left))?;
                match socket.recv_from(&mut buf) {
                    Ok((n, from)) => got.push((from, buf[..n].to_vec())),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(got)
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("UdpSink in {ns}: cannot bind {addr}: {e}"),
            Err(e) => panic!("UdpSink in {ns}: thread did not start: {e}"),
        }
        UdpSink { handle }
    }

    /// Waits for the sink to finish and returns (sender, payload) of every datagram.
    pub fn finish(self) -> Vec<Datagram> {
        self.handle
            .join()
            .expect("UdpSink thread")
            .expect("UdpSink receive")
    }
}

/// tcpdump in `ns` on `interface` with a capture `filter`; returns once it listens.
pub fn capture(lab: &mut Lab, ns: &Namespace, interface: &str, filter: &str) -> u32 {
    // Immediate mode: packets are handed over one by one, not in ring blocks that a stop
    // may leave unread. A 32 MiB buffer (`-B`, in KiB; tcpdump's default is 2 MiB): an AF_XDP
    // mux delivers bursts fast enough that a tcpdump starved of CPU on the shared 2-core
    // machine overflowed the default and reported drops.
    let mut args = vec![
        "-n",
        "-p",
        "-B",
        "32768",
        "--immediate-mode",
        "-i",
        interface,
        "-w",
        "/dev/null",
    ];
    args.extend(filter.split(' '));
    let pid = lab.spawn(ns, Command::new("tcpdump").args(&args)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lab.log(pid).contains("listening on") {
        assert!(
            Instant::now() < deadline && lab.wait(pid, Duration::ZERO).is_none(),
            "tcpdump on {interface} ({filter}) did not start: {}",
            lab.log(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    pid
}

/// Stops a [`capture`] and returns how many packets matched its filter: the kernel's count
/// ("received by filter"), which includes packets tcpdump had not read yet when stopped (its
/// "captured" count misses those, so a "none" check on it could pass wrongly).
pub fn captured(lab: &mut Lab, pid: u32) -> u64 {
    lab.signal(pid, libc::SIGINT).unwrap();
    lab.wait(pid, Duration::from_secs(10))
        .expect("tcpdump stops");
    let log = lab.log(pid);
    let count = |suffix: &str| -> u64 {
        log.lines()
            .find_map(|l| l.strip_suffix(suffix))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no tcpdump summary: {log}"))
    };
    assert_eq!(count(" packets dropped by kernel"), 0, "{log}");
    count(" packets received by filter").max(count(" packets captured"))
}

/// A node (`lb mux` or `lb agent`) a test started: its pid, control socket and config file.
#[derive(Clone, Debug)]
pub struct Node {
    /// The process.
    pub pid: u32,
    /// Its control socket.
    pub socket: std::path::PathBuf,
    /// Its config file.
    pub config: std::path::PathBuf,
}

/// Writes `config_text` (with `SOCKET` replaced by the node's control socket path) to the lab's
/// directory as `{name}.toml`, starts `lb {role} --config ... {extra_args}` in `ns`, and waits
/// until its control socket answers `status` (failing with its log if it dies or takes 20 s).
pub fn start_node(
    lab: &mut Lab,
    ns: &Namespace,
    role: &str,
    name: &str,
    config_text: &str,
    extra_args: &[&str],
) -> Node {
    let socket = lab.log_dir().join(format!("{name}.sock"));
    let config = lab.log_dir().join(format!("{name}.toml"));
    let mut text = config_text.replace("SOCKET", &format!("{socket:?}"));
    if role == "mux" || role == "agent" {
        text = lb::topology::with_lab_io(&text).unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::write(&config, text).unwrap();
    let pid = lab
        .spawn(
            ns,
            Command::new(env!("CARGO_BIN_EXE_lb"))
                .args([role, "--config"])
                .arg(&config)
                .args(extra_args)
                .env("RUST_LOG", "info"),
        )
        .unwrap();
    lb::lab::live::wait_answering(lab, pid, &socket, name).unwrap_or_else(|e| panic!("{e}"));
    Node {
        pid,
        socket,
        config,
    }
}

/// Waits (up to 5 s) for `node`, already signalled by the caller, to exit, then starts it again
/// in `ns` with the same role, name, config file and control socket.
pub fn restart_node(
    lab: &mut Lab,
    ns: &Namespace,
    role: &str,
    name: &str,
    node: &Node,
    extra_args: &[&str],
) -> Node {
    assert!(
        lab.wait(node.pid, Duration::from_secs(5)).is_some(),
        "{name} did not exit:\n{}",
        lab.log(node.pid)
    );
    let text = std::fs::read_to_string(&node.config).unwrap();
    let template = text.replace(&format!("{:?}", node.socket), "SOCKET");
    start_node(lab, ns, role, name, &template, extra_args)
}

/// An HTTP/1.0 server on `at` in `ns`, answering every request with `body` repeated 2000
/// times, after reading the request (headers and any body up to `Content-Length`).
pub fn http_server(ns: &Namespace, at: SocketAddr, body: String, stop: Arc<AtomicBool>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    ns.enter(move || {
        let listener = TcpListener::bind(at).unwrap();
        listener.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let body = body.clone();
            std::thread::spawn(move || {
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 16384];
                loop {
                    let Ok(n) = conn.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let want = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + want {
                            break;
                        }
                    }
                }
                let reply = body.repeat(2000);
                let _ = write!(
                    conn,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{reply}",
                    reply.len()
                );
            });
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
}

/// One HTTP request with a 20 kB body (full-size segments through the tunnel); returns the
/// first line of the body (the backend's name).
pub fn http_get(client: &Namespace, to: SocketAddr) -> Result<String, String> {
    client
        .enter(move || {
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .map_err(|e| format!("connect: {e}"))?;
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let upload = "x".repeat(20_000);
            write!(
                c,
                "POST / HTTP/1.0\r\nContent-Length: {}\r\n\r\n{upload}",
                upload.len()
            )
            .map_err(|e| format!("send: {e}"))?;
            let mut answer = String::new();
            c.read_to_string(&mut answer)
                .map_err(|e| format!("receive: {e}"))?;
            let (head, body) = answer.split_once("\r\n\r\n").ok_or("no header end")?;
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.parse().ok())
                .ok_or("no length")?;
            if body.len() != length {
                return Err(format!("short body: {} of {length}", body.len()));
            }
            Ok(body.lines().next().unwrap_or("").to_owned())
        })
        .join()
        .unwrap()
}

/// Sends one whole IP packet (its header included, either family) from the calling thread's
/// namespace, with the product's own raw-socket transmitter.
pub fn send_raw(packet: &[u8], to: IpAddr) {
    use lb_dataplane::device::Transmitter;
    let mut tx = lb_dataplane::rawip::RawIpTransmitter::open(1).expect("raw sockets");
    tx.queue(packet, to).expect("queued");
    let report = tx.flush().expect("flushed");
    assert_eq!(report.sent, 1, "not sent: {:?}", tx.errors());
}

/// The Prometheus text a node in `ns` serves on `address` (inside the namespace).
pub fn metrics_text(ns: &Namespace, address: &str) -> String {
    let address: SocketAddr = address.parse().unwrap();
    ns.enter(move || {
        let mut s = TcpStream::connect(address).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    })
    .join()
    .unwrap()
}

/// A line server on `VIP:port` in `ns` (backend `j`): answers each line "N" with "be<j> N", so a
/// client sees which backend holds its connection. Runs until `stop`.
pub fn line_server(ns: &Namespace, port: u16, j: usize, stop: Arc<AtomicBool>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    ns.enter(move || {
        let listener =
            TcpListener::bind(SocketAddrV4::new(lb::topology::Fleet::VIP, port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        while !stop.load(Ordering::Relaxed) {
            let Ok((conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            std::thread::spawn(move || {
                conn.set_nonblocking(false).unwrap();
                let mut writer = conn.try_clone().unwrap();
                for line in io::BufRead::lines(io::BufReader::new(conn)) {
                    let Ok(line) = line else { return };
                    if writeln!(writer, "be{j} {line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
}

/// Whether the AF_XDP steering program hands `frame` (Ethernet) to the mux: IPv4 or IPv6 by its
/// EtherType, long enough to hold the destination address, addressed to `vip`. Mirrors
/// `lb_dataplane::xdp::bpf::steering_program`.
pub fn steered_to_vip(frame: &[u8], vip: IpAddr) -> bool {
    let dst = match (frame.get(12..14), vip) {
        (Some([0x08, 0x00]), IpAddr::V4(v)) => frame.get(30..34).map(|d| d == v.octets()),
        (Some([0x86, 0xdd]), IpAddr::V6(v)) => frame.get(38..54).map(|d| d == v.octets()),
        _ => None,
    };
    // The program also needs a whole IPv4 header's worth of frame.
    dst == Some(true) && frame.len() >= 34
}
