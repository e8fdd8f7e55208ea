//! A bounded packet generator for the forwarding benchmark: Ethernet frames to a VIP, sent as
//! fast as one thread per transmit queue can (or at a set rate), until a packet count or a
//! time limit is reached.
//!
//! - **What is sent** ([`Traffic`], [`FrameSource`]): 64-byte UDP frames of a fixed set of
//!   flows (one source port each), or TCP SYN frames of a new 5-tuple each (source addresses
//!   from 198.19.0.0/16 times source ports 1024–65535: a SYN flood's new-flow rate). Frames are
//!   built with etherparse, so their checksums are right and they parse as what they claim.
//! - **How** ([`SenderKind`]): AF_PACKET `sendmmsg`, 64 frames a call, with
//!   `PACKET_QDISC_BYPASS`. Thread `q` of a run is pinned to CPU `q`: with the qdisc bypassed,
//!   Linux picks the transmit queue from the sending CPU (`cpu % queues`, the veth has no XPS
//!   map), and a veth's frame sent on transmit queue `q` arrives on its peer's receive queue
//!   `q`; so with two threads on a two-queue veth, the peer receives on both queues.
//! - **Parts**: thread `q` of `n` sends its own share of the traffic (fixed flows `i` with
//!   `i % n == q`; new flows of index `≡ q mod n`), so no flow is on two queues.
//!
//! **Invariant.** Every run is bounded in packets and in time; sockets are closed on return;
//! the generator allocates nothing per packet.

use std::io;
use std::net::Ipv4Addr;
use std::thread;
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use lb_dataplane::xdp::xsk::{Xsk, XskConfig, XskTx};

use crate::netns::Namespace;

/// Frames per `sendmmsg`.
const BATCH: usize = 64;
/// The longest frame [`FrameSource::given`] takes (and room for one in a batch buffer).
pub const MAX_FRAME: usize = 2048;
/// The frames' length (Ethernet header included, FCS excluded): the 64-byte minimum on the wire.
pub const FRAME_LEN: usize = 60;
/// First source port of the fixed flows.
const FIRST_PORT: u16 = 10_000;
/// New flows' source ports: 1024..=65535.
const NEW_FLOW_PORTS: u64 = 65_536 - 1024;

/// What the sender sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic {
    /// UDP to port 9 from this many source ports (10000, 10001, …), cycled: steady flows.
    Flows(u16),
    /// TCP SYNs to port 80, each of a 5-tuple not sent before in the run.
    NewFlows,
}

/// The addresses every frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// Ethernet source.
    pub src_mac: [u8; 6],
    /// Ethernet destination (the receiver's interface).
    pub dst_mac: [u8; 6],
    /// IPv4 source of [`Traffic::Flows`] (new flows use 198.19.0.0/16).
    pub src: Ipv4Addr,
    /// IPv4 destination: the VIP.
    pub dst: Ipv4Addr,
}

/// Writes the frames of one sender thread's share, one at a time, into caller buffers.
#[derive(Clone, Debug)]
pub struct FrameSource {
    frames: Frames,
    /// Index of the next frame (fixed: into the frames; new flows: the flow number).
    next: u64,
    /// Distance between this share's new-flow numbers.
    step: u64,
}

#[derive(Clone, Debug)]
enum Frames {
    /// Sent in turn, over and over.
    Fixed(Vec<Vec<u8>>),
    /// A TCP SYN of a new 5-tuple each, from and to these.
    NewFlows(Endpoints),
}

impl FrameSource {
    /// Share `part` of `parts` of `traffic` (see the module docs).
    #[must_use]
    pub fn new(endpoints: Endpoints, traffic: Traffic, part: usize, parts: usize) -> Self {
        let parts = parts.max(1);
        let part = part % parts;
        match traffic {
            Traffic::Flows(n) => Self {
                frames: Frames::Fixed(
                    (0..n.max(1))
                        .filter(|i| usize::from(*i) % parts == part)
                        .map(|i| udp_frame(&endpoints, FIRST_PORT.wrapping_add(i)).to_vec())
                        .collect(),
                ),
                next: 0,
                step: 1,
            },
            Traffic::NewFlows => Self {
                frames: Frames::NewFlows(endpoints),
                next: part as u64,
                step: parts as u64,
            },
        }
    }

    /// The given frames, in turn; each at most [`MAX_FRAME`] bytes.
    pub fn given(frames: Vec<Vec<u8>>) -> io::Result<Self> {
        if let Some(f) = frames.iter().find(|f| f.is_empty() || f.len() > MAX_FRAME) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a frame of {} bytes: 1 to {MAX_FRAME}", f.len()),
            ));
        }
        Ok(Self {
            frames: Frames::Fixed(frames),
            next: 0,
            step: 1,
        })
    }

    /// Whether this share has no frame at all (more parts than fixed flows).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        matches!(&self.frames, Frames::Fixed(f) if f.is_empty())
    }

    /// Writes the next frame into `buf` and returns its length; 0 if there is none (more parts
    /// than fixed flows, or no frames given) or `buf` is too short for it.
    pub fn write_next(&mut self, buf: &mut [u8]) -> usize {
        match &self.frames {
            Frames::Fixed(frames) => {
                if frames.is_empty() {
                    return 0;
                }
                let i = usize::try_from(self.next % frames.len() as u64).unwrap_or(0);
                let frame = &frames[i];
                let Some(out) = buf.get_mut(..frame.len()) else {
                    return 0;
                };
                self.next = self.next.wrapping_add(1);
                out.copy_from_slice(frame);
                frame.len()
            }
            Frames::NewFlows(e) => {
                let Some(out) = buf.get_mut(..FRAME_LEN) else {
                    return 0;
                };
                let (src, port) = new_flow(self.next);
                self.next = self.next.wrapping_add(self.step);
                out.fill(0);
                let written = PacketBuilder::ethernet2(e.src_mac, e.dst_mac)
                    .ipv4(src.octets(), e.dst.octets(), 64)
                    .tcp(port, 80, 0x1000_0000, 64_240)
                    .syn()
                    .write_to_slice(out, &[]);
                if written.is_err() {
                    return 0;
                }
                FRAME_LEN
            }
        }
    }
}

/// Sends `frames` in turn on `interface`, in the calling thread's network namespace, with
/// AF_PACKET, until `max_packets` were sent or `duration` passed.
pub fn blast(
    interface: &str,
    frames: &[Vec<u8>],
    duration: Duration,
    max_packets: u64,
) -> io::Result<Sent> {
    af_packet(
        interface,
        FrameSource::given(frames.to_vec())?,
        Limits {
            duration,
            max_packets,
            pps: None,
        },
    )
}

/// New flow number `n`: source 198.19.h.l and source port (the number's digits in base
/// [`NEW_FLOW_PORTS`]); distinct for the first 2^16 × 64512 numbers.
fn new_flow(n: u64) -> (Ipv4Addr, u16) {
    let port = 1024 + u16::try_from(n % NEW_FLOW_PORTS).unwrap_or(0);
    let host = ((n / NEW_FLOW_PORTS) & 0xffff) as u16;
    let [h, l] = host.to_be_bytes();
    (Ipv4Addr::new(198, 19, h, l), port)
}

/// A 64-byte UDP frame from source port `sport`
/// to port 9 of the VIP.
fn udp_frame(e: &Endpoints, sport: u16) -> [u8; FRAME_LEN] {
    let mut frame = [0u8; FRAME_LEN];
    let header = 14 + 20 + 8;
    let payload = [0u8; FRAME_LEN - 14 - 20 - 8];
    let builder = PacketBuilder::ethernet2(e.src_mac, e.dst_mac)
        .ipv4(e.src.octets(), e.dst.octets(), 64)
        .udp(sport, 9);
    // A fixed-size frame into a buffer of exactly its size: cannot fail.
    let _ = builder.write_to_slice(&mut frame, &payload);
    debug_assert_eq!(header + payload.len(), FRAME_LEN);
    frame
}

/// How frames are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SenderKind {
    /// AF_PACKET `sendmmsg` with `PACKET_QDISC_BYPASS`.
    AfPacket,
    /// An AF_XDP socket per thread ([`lb_dataplane::xdp::xsk`]), bound to transmit queue `q`.
    AfXdp,
}

impl SenderKind {
    /// The name used in the benchmark's output.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::AfPacket => "af_packet",
            Self::AfXdp => "af_xdp",
        }
    }
}

/// Whether an AF_XDP send socket opens on queue 0 of `interface` in `ns` (`Err`: why not).
pub fn af_xdp_opens(ns: &Namespace, interface: &str) -> io::Result<()> {
    let interface = interface.to_owned();
    ns.enter(move || open_xsk(&interface, 0).map(drop))
        .join()
        .map_err(|_| io::Error::other("AF_XDP probe thread panicked"))?
}

/// The bounds and pace of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Stop after this long.
    pub duration: Duration,
    /// Stop after this many frames (all threads together).
    pub max_packets: u64,
    /// Send at most this many frames per second (all threads together); `None`: as fast as
    /// possible.
    pub pps: Option<u64>,
}

/// What a run sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Frames the kernel accepted.
    pub packets: u64,
    /// How long it ran (the longest thread).
    pub elapsed: Duration,
}

impl Sent {
    /// Frames per second.
    #[must_use]
    pub fn pps(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Sends `traffic` from `endpoints` on `interface` of namespace `ns` with `threads` threads
/// (thread `q` on transmit queue `q`, see the module docs) within `limits`.
pub fn run(
    kind: SenderKind,
    ns: &Namespace,
    interface: &str,
    endpoints: Endpoints,
    traffic: Traffic,
    threads: usize,
    limits: Limits,
) -> io::Result<Sent> {
    let threads = threads.max(1);
    let share = Limits {
        max_packets: limits.max_packets / threads as u64,
        pps: limits.pps.map(|p| (p / threads as u64).max(1)),
        ..limits
    };
    let handles: Vec<_> = (0..threads)
        .map(|q| {
            let interface = interface.to_owned();
            let source = FrameSource::new(endpoints, traffic, q, threads);
            ns.enter(move || match kind {
                SenderKind::AfPacket => {
                    // The queue follows the CPU (see the module docs).
                    pin_to_cpu(q)?;
                    af_packet(&interface, source, share)
                }
                // The socket's queue is explicit: left to the scheduler.
                SenderKind::AfXdp => af_xdp(&interface, q, source, share),
            })
        })
        .collect();
    let mut total = Sent::default();
    for handle in handles {
        let sent = handle
            .join()
            .map_err(|_| io::Error::other("sender thread panicked"))??;
        total.packets += sent.packets;
        total.elapsed = total.elapsed.max(sent.elapsed);
    }
    Ok(total)
}

/// Pins the calling thread to CPU `q` modulo the CPUs this process may use.
fn pin_to_cpu(q: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most `size_of::<cpu_set_t>()` bytes into `allowed`.
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut allowed) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads bit `c` (< CPU_SETSIZE) of an initialised set.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &allowed) })
        .collect();
    let Some(&cpu) = cpus.get(q % cpus.len().max(1)) else {
        return Ok(());
    };
    // SAFETY: as above.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes bit `cpu` (< CPU_SETSIZE) of the set.
    unsafe { libc::CPU_SET(cpu, &mut one) };
    // SAFETY: sched_setaffinity reads the set; 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const one) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Keeps a sender at its rate: how long to wait before the next batch.
#[derive(Clone, Copy, Debug)]
struct Pace {
    start: Instant,
    pps: Option<u64>,
}

impl Pace {
    /// Sleeps while `sent` frames are ahead of the rate.
    fn wait(&self, sent: u64) {
        if let Some(pps) = self.pps {
            let due = Duration::from_secs_f64(sent as f64 / pps as f64);
            let now = self.start.elapsed();
            if due > now {
                thread::sleep(due - now);
            }
        }
    }
}

/// One AF_PACKET sender thread (in the caller's namespace).
fn af_packet(interface: &str, mut source: FrameSource, limits: Limits) -> io::Result<Sent> {
    let index = interface_index(interface)?;
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let _close = CloseOnDrop(fd);
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `one` (a c_int of the given size) during the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_ifindex = index;
    address.sll_halen = 6;
    let mut buffer = vec![0u8; BATCH * MAX_FRAME];
    let mut lengths = [0usize; BATCH];
    // SAFETY: iovec and mmsghdr are plain old data; all-zero is a valid value.
    let mut iovecs: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    let pace = Pace {
        start: Instant::now(),
        pps: limits.pps,
    };
    let mut sent = 0u64;
    // Frames written into `buffer` and not yet accepted: [first, first + pending).
    let (mut first, mut pending) = (0usize, 0usize);
    while sent < limits.max_packets && pace.start.elapsed() < limits.duration {
        if pending == 0 {
            let want = BATCH.min(usize::try_from(limits.max_packets - sent).unwrap_or(BATCH));
            for (slot, len) in lengths.iter_mut().enumerate().take(want) {
                *len = source.write_next(&mut buffer[slot * MAX_FRAME..(slot + 1) * MAX_FRAME]);
                if *len == 0 {
                    return Ok(Sent {
                        packets: sent,
                        elapsed: pace.start.elapsed(),
                    });
                }
            }
            (first, pending) = (0, want);
        }
        for slot in first..first + pending {
            iovecs[slot] = libc::iovec {
                iov_base: buffer[slot * MAX_FRAME..].as_mut_ptr().cast(),
                iov_len: lengths[slot],
            };
            let msg = &mut headers[slot].msg_hdr;
            msg.msg_name = (&raw mut address).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            msg.msg_iov = &raw mut iovecs[slot];
            msg.msg_iovlen = 1;
        }
        // SAFETY: headers[first..first + pending] are initialised mmsghdr whose iovecs point
        // into `buffer` and whose names point at `address`; all outlive the call.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                headers[first..].as_mut_ptr(),
                pending as libc::c_uint,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
        let n = n as usize;
        sent += n as u64;
        first += n;
        pending -= n;
        pace.wait(sent);
    }
    Ok(Sent {
        packets: sent,
        elapsed: pace.start.elapsed(),
    })
}

/// Frames pushed to an AF_XDP socket per flush (copy mode moves 32 per `sendto` kick).
const XDP_BATCH: u64 = 256;

/// An AF_XDP send-only socket on queue `queue` of `interface` (calling thread's namespace).
fn open_xsk(interface: &str, queue: usize) -> io::Result<XskTx> {
    let index = interface_index(interface)?;
    let config = XskConfig {
        frame_size: MAX_FRAME as u32,
        rx_frames: 0,
        tx_frames: 2048,
    };
    let queue = u32::try_from(queue).map_err(|_| io::Error::other("queue out of range"))?;
    // (Xsk::open waits out a queue still busy from the probe's socket, closed a moment ago.)
    let (_, tx, _mode, _why_not_zero_copy) = Xsk::open(index.unsigned_abs(), queue, config)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("AF_XDP socket on {interface} queue {queue}: {e}"),
            )
        })?;
    Ok(tx)
}

/// One AF_XDP sender thread on transmit queue `queue` (in the caller's namespace): pushes up
/// to [`XDP_BATCH`] frames, flushes, counts what the kernel took.
fn af_xdp(
    interface: &str,
    queue: usize,
    mut source: FrameSource,
    limits: Limits,
) -> io::Result<Sent> {
    if source.is_empty() {
        return Ok(Sent::default());
    }
    let mut tx = open_xsk(interface, queue)?;
    let pace = Pace {
        start: Instant::now(),
        pps: limits.pps,
    };
    let mut sent = 0u64;
    while sent < limits.max_packets && pace.start.elapsed() < limits.duration {
        let room = limits
            .max_packets
            .saturating_sub(sent + u64::from(tx.unsent()))
            .min(XDP_BATCH);
        for _ in 0..room {
            if !tx.push_with(|buf| source.write_next(buf)) {
                break;
            }
        }
        sent += tx.flush()?;
        pace.wait(sent);
    }
    Ok(Sent {
        packets: sent,
        elapsed: pace.start.elapsed(),
    })
}

/// The index of `interface` in the calling thread's namespace.
fn interface_index(interface: &str) -> io::Result<i32> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {interface}"),
        ));
    }
    i32::try_from(index)
        .map_err(|_| io::Error::other(format!("{interface}: index {index} too large")))
}

struct CloseOnDrop(libc::c_int);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        // SAFETY: the descriptor was opened by this module and is closed once, here.
        unsafe { libc::close(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use lb_core::flow::{FlowKey, PROTO_TCP, PROTO_UDP};
    use lb_core::packet::{Kind, Link, parse};

    use super::*;

    const ENDPOINTS: Endpoints = Endpoints {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        src: Ipv4Addr::new(198, 18, 40, 2),
        dst: Ipv4Addr::new(198, 18, 100, 1),
    };

    fn flows_of(source: &mut FrameSource, count: usize) -> Vec<(FlowKey, bool)> {
        let mut buf = [0u8; MAX_FRAME];
        (0..count)
            .map(|_| {
                assert_eq!(source.write_next(&mut buf), FRAME_LEN);
                let parsed =
                    parse(&buf[..FRAME_LEN], Link::Ethernet).expect("the mux's parser takes it");
                match parsed.kind {
                    Kind::Transport { flow, syn } => (flow, syn),
                    other => panic!("not a transport frame: {other:?}"),
                }
            })
            .collect()
    }

    #[test]
    fn fixed_flows_cycle_over_their_ports_split_between_parts() {
        let mut a = FrameSource::new(ENDPOINTS, Traffic::Flows(4), 0, 2);
        let mut b = FrameSource::new(ENDPOINTS, Traffic::Flows(4), 1, 2);
        let udp = |port| {
            (
                FlowKey::v4(ENDPOINTS.src, ENDPOINTS.dst, PROTO_UDP, port, 9),
                false,
            )
        };
        assert_eq!(flows_of(&mut a, 3), [udp(10_000), udp(10_002), udp(10_000)]);
        assert_eq!(flows_of(&mut b, 2), [udp(10_001), udp(10_003)]);
        // More parts than flows: an empty share says so.
        let mut empty = FrameSource::new(ENDPOINTS, Traffic::Flows(1), 1, 2);
        assert_eq!(empty.write_next(&mut [0u8; MAX_FRAME]), 0);
    }

    #[test]
    fn new_flows_are_syns_of_distinct_tuples_in_every_part() {
        let mut seen = HashSet::new();
        for part in 0..2 {
            let mut source = FrameSource::new(ENDPOINTS, Traffic::NewFlows, part, 2);
            for (flow, syn) in flows_of(&mut source, 70_000) {
                assert!(syn);
                assert!(seen.insert(flow), "{flow:?} twice");
            }
        }
        assert_eq!(
            new_flow(NEW_FLOW_PORTS + 1),
            (Ipv4Addr::new(198, 19, 0, 1), 1025)
        );
        let (flow, _) = flows_of(&mut FrameSource::new(ENDPOINTS, Traffic::NewFlows, 0, 1), 1)[0];
        assert_eq!(
            flow,
            FlowKey::v4(
                Ipv4Addr::new(198, 19, 0, 0),
                ENDPOINTS.dst,
                PROTO_TCP,
                1024,
                80
            )
        );
    }

    #[test]
    fn a_short_buffer_gets_nothing() {
        let mut source = FrameSource::new(ENDPOINTS, Traffic::NewFlows, 0, 1);
        assert_eq!(source.write_next(&mut [0u8; FRAME_LEN - 1]), 0);
    }
}
