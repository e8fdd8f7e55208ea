//! AF_XDP packet I/O for the mux: kernel bypass on the receive side (frames go from the driver
//! into a UMEM the worker reads, without the kernel's IP stack) and on the send side (frames go
//! from the UMEM to the driver, without route lookup, netfilter or a socket per packet).
//!
//! - [`bpf`]: the steering program (emitted here as raw instructions, no BPF toolchain), its
//!   maps and its attachment as a BPF link.
//! - [`xsk`]: one AF_XDP socket, its UMEM and rings, split into a receiving and a sending half.
//! - [`neighbour`]: next hops (output interface, Ethernet addresses) from the kernel's routing
//!   and neighbour tables over rtnetlink, refreshed by a thread.
//! - [`AfXdpReceiver`] / [`AfXdpTransmitter`]: the [`Receiver`] / [`Transmitter`] of one worker.
//! - [`open`]: the whole set-up for a mux, and its [`Steering`] (the attached program, the VIP
//!   map kept equal to the published snapshot, the resolver).
//!
//! **Why hand-written, not a crate.** The program is 45 instructions; emitting them needs no
//! clang, bpf-linker or nightly toolchain, which aya-ebpf or libbpf's C programs would (CI would
//! have to install them). Loading them needs four `bpf(2)` commands. aya's loader wants an ELF
//! object; libxdp/xsk-rs link libbpf and libelf in C; `xdpilone` (pure Rust rings) is
//! EUPL-1.2, a copyleft licence this MIT/Apache project does not take on. The rings are the
//! kernel's documented SPSC protocol ([`xsk`]), a few hundred lines with their invariants.
//!
//! **Layout.** Every receive queue of `node.interface` gets a socket (a frame on a queue without
//! one would reach the kernel, which drops VIP traffic); worker *w* of *W* reads queues *w*,
//! *w* + *W*, ... and sends from its first queue's socket. Each socket's UMEM is split between
//! its receive frames and its send frames. A packet to a
//! destination whose next hop leaves by another interface is sent from a send-only socket on
//! queue *i* of that interface, opened on first use. The worker copies each received frame
//! into its batch arena and each output into a send frame, as with AF_PACKET: received and sent
//! frames share the UMEM but not frames (see BENCHMARKS.md for what the in-place variant would
//! save).
//!
//! **Fallbacks**, each logged once with its reason and shown in `lb status` (`io`):
//! zero-copy → copy mode (veth has no zero-copy), driver → skb mode, and with `node.io = "auto"`
//! AF_XDP → AF_PACKET. A packet whose next hop is not resolved, or that does not fit a frame,
//! is sent on the raw-socket path (the kernel resolves the neighbour), counted as
//! `tx_slow_path`.
//!
//! **Invariants.** Per packet: no allocation, no lock, no syscall (the next-hop table is loaded
//! once per batch). The program is attached by a BPF link, so it is detached whenever the
//! process ends, SIGKILL included, and a restarted mux attaches at once; a program someone else
//! attached is never replaced (the link fails with `EBUSY` and the mux falls back or stops).

pub mod bpf;
pub mod neighbour;
pub mod xsk;

use std::io;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use lb_core::packet::Link;
use lb_core::snapshot::Snapshot;

use self::bpf::{AttachMode, VipMap, XskMap};
use self::neighbour::{NextHops, Resolver};
use self::xsk::{BindMode, Xsk, XskConfig, XskRx, XskTx};
use crate::device::{Receiver, Transmitter};
use crate::rawip::RawIpTransmitter;

/// Ethernet header bytes in front of every sent packet.
const ETHERNET: usize = 14;

/// A send-only socket on another interface, or why it could not be opened.
#[derive(Debug)]
enum Egress {
    Open(XskTx),
    /// Not usable; retried after the instant.
    Refused(Instant),
}

/// How long an interface whose send socket could not be opened is left to the slow path.
const RETRY_EGRESS: Duration = Duration::from_secs(5);

/// The sending device of one worker: AF_XDP sockets per output interface, with the raw-socket
/// path for what they cannot send.
#[derive(Debug)]
pub struct AfXdpTransmitter {
    queue: u32,
    /// The interface the worker receives on, and its socket's TX half.
    home: (u32, XskTx),
    /// Other output interfaces, in the order first used.
    others: Vec<(u32, Egress)>,
    /// Interfaces wanted by packets of this batch that have no socket yet.
    wanted: Vec<u32>,
    hops: Arc<ArcSwap<NextHops>>,
    current: Arc<NextHops>,
    slow: RawIpTransmitter,
    slow_path: u64,
    no_frame: u64,
    /// Frames sent by a flush in the middle of a batch (its rings were full), reported with the
    /// batch's own flush.
    sent_early: u64,
}

fn ethertype(packet: &[u8]) -> [u8; 2] {
    if packet.first().is_some_and(|b| b >> 4 == 6) {
        [0x86, 0xdd]
    } else {
        [0x08, 0x00]
    }
}

impl AfXdpTransmitter {
    fn socket_for(&mut self, ifindex: u32) -> Option<&mut XskTx> {
        if ifindex == self.home.0 {
            return Some(&mut self.home.1);
        }
        match self.others.iter_mut().find(|(i, _)| *i == ifindex) {
            Some((_, Egress::Open(tx))) => Some(tx),
            Some((_, Egress::Refused(_))) => None,
            None => {
                if !self.wanted.contains(&ifindex) && self.wanted.len() < self.wanted.capacity() {
                    self.wanted.push(ifindex);
                }
                None
            }
        }
    }

    /// Opens send sockets for the interfaces this batch wanted (a batch boundary: a few
    /// syscalls once per interface, retried every [`RETRY_EGRESS`] when refused).
    fn open_wanted(&mut self) {
        let now = Instant::now();
        for ifindex in std::mem::take(&mut self.wanted) {
            let config = XskConfig {
                rx_frames: 0,
                ..XskConfig::default()
            };
            let egress = match Xsk::open(ifindex, self.queue, config) {
                Ok((_, tx, _, _)) => Egress::Open(tx),
                Err(e) => {
                    tracing::warn!(ifindex, queue = self.queue, error = %e, "cannot send with AF_XDP on this interface; its packets take the kernel's path");
                    Egress::Refused(now + RETRY_EGRESS)
                }
            };
            self.others.push((ifindex, egress));
        }
        self.others
            .retain(|(_, e)| !matches!(e, Egress::Refused(until) if *until <= now));
    }

    fn flush_sockets(&mut self) -> io::Result<u64> {
        let mut sent = self.home.1.flush()?;
        for (_, e) in &mut self.others {
            if let Egress::Open(tx) = e {
                sent += tx.flush()?;
            }
        }
        Ok(sent)
    }
}

impl Transmitter for AfXdpTransmitter {
    fn queue(&mut self, packet: &[u8], destination: IpAddr) -> io::Result<()> {
        if let Some(hop) = self.current.get(destination).copied()
            && let Some(tx) = self.socket_for(hop.ifindex)
            && packet.len() + ETHERNET <= tx.max_frame()
        {
            let write = |buf: &mut [u8]| {
                buf[..6].copy_from_slice(&hop.destination);
                buf[6..12].copy_from_slice(&hop.source);
                buf[12..14].copy_from_slice(&ethertype(packet));
                buf[ETHERNET..ETHERNET + packet.len()].copy_from_slice(packet);
                ETHERNET + packet.len()
            };
            if tx.push_with(write) {
                return Ok(());
            }
            // Ring or frames full: send what is queued, then try once more.
            self.sent_early += self.flush_sockets()?;
            let Some(tx) = self.socket_for(hop.ifindex) else {
                return Ok(());
            };
            if !tx.push_with(write) {
                self.no_frame += 1;
            }
            return Ok(());
        }
        self.slow_path += 1;
        self.slow.queue(packet, destination)
    }

    fn flush(&mut self) -> io::Result<crate::device::FlushReport> {
        let sent = self.flush_sockets()?;
        let mut report = self.slow.flush()?;
        report.sent += sent + std::mem::take(&mut self.sent_early);
        report.failed += std::mem::take(&mut self.no_frame);
        if !self.wanted.is_empty()
            || self
                .others
                .iter()
                .any(|(_, e)| matches!(e, Egress::Refused(_)))
        {
            self.open_wanted();
        }
        self.current = self.hops.load_full();
        Ok(report)
    }

    fn queued(&self) -> usize {
        let others: u32 = self
            .others
            .iter()
            .map(|(_, e)| match e {
                Egress::Open(tx) => tx.unsent(),
                Egress::Refused(_) => 0,
            })
            .sum();
        (self.home.1.unsent() + others) as usize
            + self.slow.queued()
            + usize::from(!self.wanted.is_empty())
    }

    fn slow_path(&self) -> u64 {
        self.slow_path
    }
}

/// The AF_XDP mode in force, for status and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpMode {
    /// Where the steering program runs.
    pub attach: AttachMode,
    /// How the sockets are bound.
    pub bind: BindMode,
    /// Receive queues with a socket (all of the interface's).
    pub queues: u32,
    /// Why a preferred mode was not used (zero-copy, driver mode), if one was not.
    pub fallbacks: Vec<String>,
}

/// What keeps AF_XDP steering in place: the attached program, its maps and the next-hop
/// resolver. Dropping it detaches the program.
#[derive(Debug)]
pub struct Steering {
    vips: VipMap,
    _xsks: XskMap,
    _program: OwnedFd,
    _link: OwnedFd,
    /// The mux's next hops (the agent sends through the kernel: none).
    resolver: Option<Resolver>,
}

/// The addresses a snapshot receives traffic for: every VIP address (SNAT return traffic is
/// addressed to VIP addresses too).
fn vip_addresses(snapshot: &Snapshot) -> Vec<IpAddr> {
    let mut a: Vec<IpAddr> = snapshot.vips.iter().map(|v| v.address).collect();
    a.sort_unstable();
    a.dedup();
    a
}

/// The destinations a snapshot sends to: every backend.
fn destinations(snapshot: &Snapshot) -> Vec<IpAddr> {
    let mut d: Vec<IpAddr> = snapshot
        .vips
        .iter()
        .flat_map(|v| v.table.backends().iter().map(|b| b.id.0))
        .collect();
    d.sort_unstable();
    d.dedup();
    d
}

impl crate::control::PublishHook for Steering {
    fn before_publish(&self, snapshot: &Snapshot) {
        Steering::before_publish(self, snapshot);
    }

    fn after_publish(&self, snapshot: &Snapshot) {
        Steering::after_publish(self, snapshot);
    }
}

impl Steering {
    /// Before `snapshot` is published: steer its VIP addresses too, and resolve its backends.
    pub fn before_publish(&self, snapshot: &Snapshot) {
        if let Err(e) = self.vips.add(&vip_addresses(snapshot), bpf::KIND_ANY) {
            tracing::error!(error = %e, "cannot add VIP addresses to the AF_XDP steering map; their traffic goes to the kernel");
        }
        if let Some(r) = &self.resolver {
            r.set_destinations(destinations(snapshot));
        }
    }

    /// After `snapshot` is published: stop steering addresses it no longer has.
    pub fn after_publish(&self, snapshot: &Snapshot) {
        if let Err(e) = self.vips.retain(&vip_addresses(snapshot)) {
            tracing::error!(error = %e, "cannot remove old VIP addresses from the AF_XDP steering map");
        }
    }

    /// The addresses steered now, for tests and status.
    pub fn steered(&self) -> io::Result<usize> {
        self.vips.keys().map(|k| k.len())
    }
}

/// The receive halves a worker reads, and the queue and send half of its first.
type WorkerSockets = (Vec<XskRx>, Option<(u32, XskTx)>);

/// One worker's pair of AF_XDP devices.
pub type XdpDevices = (AfXdpReceiver, AfXdpTransmitter);

fn step(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// The program attached to an interface with a socket on each of the first `count` receive
/// queues.
struct Attached {
    index: u32,
    sockets: Vec<(u32, XskRx, XskTx)>,
    vips: VipMap,
    xsks: XskMap,
    program: OwnedFd,
    link: OwnedFd,
    mode: XdpMode,
}

/// Opens a socket on every receive queue of `interface`, steers `addresses` of `kind` into
/// them and attaches the program (driver mode, else skb mode; never over someone else's
/// program).
fn attach(
    interface: &str,
    addresses: &[IpAddr],
    kind: u32,
    config: XskConfig,
) -> io::Result<Attached> {
    let link = neighbour::link_info(interface).map_err(step(format!("interface {interface}")))?;
    let (index, count, mtu) = (link.index, link.rx_queues, link.mtu);
    if mtu + ETHERNET as u32 > config.max_frame() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{interface}: MTU {mtu} does not fit an AF_XDP frame of {} bytes",
                config.max_frame()
            ),
        ));
    }
    let vips = VipMap::create().map_err(step("creating the steering map".into()))?;
    vips.add(addresses, kind)
        .map_err(step("filling the steering map".into()))?;
    let xsks = XskMap::create(count).map_err(step("creating the XSKMAP".into()))?;
    let mut fallbacks = Vec::new();
    let mut bind = BindMode::ZeroCopy;
    let mut sockets = Vec::with_capacity(count as usize);
    for queue in 0..count {
        let (rx, tx, mode, why) = Xsk::open(index, queue, config)
            .map_err(step(format!("AF_XDP socket on {interface} queue {queue}")))?;
        let rx = rx.ok_or_else(|| io::Error::other("socket opened without its receive ring"))?;
        xsks.insert(queue, rx.raw_fd())
            .map_err(step(format!("XSKMAP slot {queue}")))?;
        bind = mode;
        if let Some(why) = why
            && queue == 0
        {
            fallbacks.push(why);
        }
        sockets.push((queue, rx, tx));
    }
    let program = bpf::load_xdp(&bpf::steering_program(vips.raw_fd(), xsks.raw_fd()))
        .map_err(step("loading the steering program".into()))?;
    let (link, attach) = match bpf::attach_link(&program, index, AttachMode::Driver) {
        Ok(l) => (l, AttachMode::Driver),
        Err(driver) if driver.raw_os_error() == Some(libc::EBUSY) => {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "{interface} already has an XDP program attached by someone else; it is left in place"
                ),
            ));
        }
        Err(driver) => {
            let l = bpf::attach_link(&program, index, AttachMode::Skb).map_err(step(format!(
                "attaching to {interface} (driver mode: {driver}; skb mode)"
            )))?;
            fallbacks.push(format!("driver-mode XDP refused: {driver}"));
            (l, AttachMode::Skb)
        }
    };
    Ok(Attached {
        index,
        sockets,
        vips,
        xsks,
        program,
        link,
        mode: XdpMode {
            attach,
            bind,
            queues: count,
            fallbacks,
        },
    })
}

/// Sets up AF_XDP on `interface` for `workers` workers (at most one per receive queue; a
/// socket on every queue, worker *w* of *W* reading queues *w*, *w* + *W*, ...), steering the
/// VIP addresses of `snapshot`: the devices of each worker, the [`Steering`] to keep while they
/// run, and the mode in force. Errors say which step failed.
pub fn open(
    interface: &str,
    workers: usize,
    snapshot: &Snapshot,
) -> io::Result<(Vec<XdpDevices>, Steering, XdpMode)> {
    let resolver = Resolver::start(destinations(snapshot))
        .map_err(step("reading next hops over rtnetlink".into()))?;
    // A socket on every queue: a frame on a queue without one would go to the kernel, which
    // drops VIP traffic. Worker w reads queues w, w + workers, ...
    let a = attach(
        interface,
        &vip_addresses(snapshot),
        bpf::KIND_ANY,
        XskConfig::default(),
    )?;
    let hops = resolver.table();
    let home = a.index;
    let workers = workers.clamp(1, a.sockets.len());
    let mut owned: Vec<WorkerSockets> = (0..workers).map(|_| (Vec::new(), None)).collect();
    for (queue, rx, tx) in a.sockets {
        let (rxs, first) = &mut owned[queue as usize % workers];
        rxs.push(rx);
        // The worker sends from its first queue's socket; the others' send halves are unused.
        if first.is_none() {
            *first = Some((queue, tx));
        }
    }
    let devices = owned
        .into_iter()
        .map(|(rxs, first)| {
            let (queue, tx) = first.ok_or_else(|| io::Error::other("a worker without a queue"))?;
            let slow = RawIpTransmitter::open(crate::mux::TX_QUEUE)?;
            Ok((
                AfXdpReceiver::new(rxs),
                AfXdpTransmitter {
                    queue,
                    home: (home, tx),
                    others: Vec::new(),
                    wanted: Vec::with_capacity(8),
                    current: hops.load_full(),
                    hops: Arc::clone(&hops),
                    slow,
                    slow_path: 0,
                    no_frame: 0,
                    sent_early: 0,
                },
            ))
        })
        .collect::<io::Result<Vec<_>>>()?;
    let steering = Steering {
        vips: a.vips,
        _xsks: a.xsks,
        _program: a.program,
        _link: a.link,
        resolver: Some(resolver),
    };
    Ok((devices, steering, a.mode))
}

/// The receiving device of one reader (a mux worker, the agent): the sockets of the receive
/// queues it owns, read in turn.
#[derive(Debug)]
pub struct AfXdpReceiver {
    queues: Vec<XskRx>,
    /// The queue read first in the next batch, so that no queue starves another.
    next: usize,
    fds: Vec<libc::pollfd>,
}

impl Receiver for AfXdpReceiver {
    fn link(&self) -> Link {
        Link::Ethernet
    }

    fn receive(
        &mut self,
        max_frames: usize,
        timeout: Duration,
        on_frame: &mut dyn FnMut(&[u8]),
    ) -> io::Result<usize> {
        let mut got = self.drain(max_frames, on_frame)?;
        if got == 0 && !timeout.is_zero() {
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            for p in &mut self.fds {
                p.revents = 0;
            }
            // SAFETY: `fds` is a live array of valid pollfds of the length passed.
            let r =
                unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            got = self.drain(max_frames, on_frame)?;
        }
        Ok(got)
    }

    fn kernel_drops(&mut self) -> u64 {
        self.queues.iter().map(|q| q.dropped().unwrap_or(0)).sum()
    }
}

impl AfXdpReceiver {
    fn new(queues: Vec<XskRx>) -> Self {
        let fds = queues
            .iter()
            .map(|rx| libc::pollfd {
                fd: rx.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        Self {
            queues,
            next: 0,
            fds,
        }
    }

    /// Reads what is ready, without waiting, queue after queue from `next`.
    fn drain(&mut self, max_frames: usize, on_frame: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        let n = self.queues.len();
        let mut got = 0;
        for i in 0..n {
            if got >= max_frames {
                break;
            }
            let q = (self.next + i) % n;
            got += self.queues[q].receive(max_frames - got, Duration::ZERO, on_frame)?;
        }
        self.next = (self.next + 1) % n.max(1);
        Ok(got)
    }
}

/// Sets up AF_XDP receiving on every queue of `interface` for one reader (the agent), steering
/// only tunnel packets (IP-in-IP, IPv6-in-IP, GRE) to `addresses`: everything else to those
/// addresses (health checks, SSH) stays the kernel's.
pub fn open_tunnel_receiver(
    interface: &str,
    addresses: &[IpAddr],
) -> io::Result<(AfXdpReceiver, Steering, XdpMode)> {
    // The agent sends through the kernel: its sockets need few send frames.
    let config = XskConfig {
        rx_frames: 2048,
        tx_frames: 64,
        ..XskConfig::default()
    };
    let a = attach(interface, addresses, bpf::KIND_TUNNELS, config)?;
    let queues = a.sockets.into_iter().map(|(_, rx, _)| rx).collect();
    let steering = Steering {
        vips: a.vips,
        _xsks: a.xsks,
        _program: a.program,
        _link: a.link,
        resolver: None,
    };
    Ok((AfXdpReceiver::new(queues), steering, a.mode))
}
