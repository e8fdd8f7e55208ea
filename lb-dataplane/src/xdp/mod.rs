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
//! **Why hand-written, not a crate.** The program is 35 instructions; emitting them needs no
//! clang, bpf-linker or nightly toolchain, which aya-ebpf or libbpf's C programs would (CI would
//! have to install them). Loading them needs four `bpf(2)` commands. aya's loader wants an ELF
//! object; libxdp/xsk-rs link libbpf and libelf in C; `xdpilone` (pure Rust rings) is
//! EUPL-1.2, a copyleft licence this MIT/Apache project does not take on. The rings are the
//! kernel's documented SPSC protocol ([`xsk`]), a few hundred lines with their invariants.
//!
//! **Layout.** Worker *i* owns one socket bound to receive queue *i* of `node.interface`; the
//! socket's UMEM is split between its receive frames and its send frames. A packet to a
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

/// The receiving device of one worker: its socket's RX half.
#[derive(Debug)]
pub struct AfXdpReceiver {
    rx: XskRx,
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
        self.rx.receive(max_frames, timeout, on_frame)
    }

    fn kernel_drops(&mut self) -> u64 {
        self.rx.dropped().unwrap_or(0)
    }
}

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
            self.flush_sockets()?;
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
        report.sent += sent;
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
    /// Receive queues with a socket (= workers).
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
    resolver: Resolver,
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
        if let Err(e) = self.vips.add(&vip_addresses(snapshot)) {
            tracing::error!(error = %e, "cannot add VIP addresses to the AF_XDP steering map; their traffic goes to the kernel");
        }
        self.resolver.set_destinations(destinations(snapshot));
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

/// One worker's pair of AF_XDP devices.
pub type XdpDevices = (AfXdpReceiver, AfXdpTransmitter);

/// Sets up AF_XDP on `interface` for `workers` workers (at most one per receive queue),
/// steering the VIP addresses of `snapshot`: the devices of each worker, the [`Steering`] to
/// keep while they run, and the mode in force. Errors say which step failed.
pub fn open(
    interface: &str,
    workers: usize,
    snapshot: &Snapshot,
) -> io::Result<(Vec<XdpDevices>, Steering, XdpMode)> {
    let step = |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    let link = neighbour::link_info(interface).map_err(step(format!("interface {interface}")))?;
    let (home, queues, mtu) = (link.index, link.rx_queues, link.mtu);
    let count = u32::try_from(workers).unwrap_or(u32::MAX).clamp(1, queues);
    let config = XskConfig::default();
    if mtu + ETHERNET as u32 > config.max_frame() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{interface}: MTU {mtu} does not fit an AF_XDP frame of {} bytes",
                config.max_frame()
            ),
        ));
    }
    let vips = VipMap::create().map_err(step("creating the VIP map".into()))?;
    vips.add(&vip_addresses(snapshot))
        .map_err(step("filling the VIP map".into()))?;
    let xsks = XskMap::create(queues).map_err(step("creating the XSKMAP".into()))?;
    let resolver = Resolver::start(destinations(snapshot))
        .map_err(step("reading next hops over rtnetlink".into()))?;
    let mut fallbacks = Vec::new();
    let mut bind = BindMode::ZeroCopy;
    let mut sockets = Vec::with_capacity(count as usize);
    for queue in 0..count {
        let (rx, tx, mode, why) = Xsk::open(home, queue, config)
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
    let (link, attach) = match bpf::attach_link(&program, home, AttachMode::Driver) {
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
            let l = bpf::attach_link(&program, home, AttachMode::Skb).map_err(step(format!(
                "attaching to {interface} (driver mode: {driver}; skb mode)"
            )))?;
            fallbacks.push(format!("driver-mode XDP refused: {driver}"));
            (l, AttachMode::Skb)
        }
    };
    let hops = resolver.table();
    let devices = sockets
        .into_iter()
        .map(|(queue, rx, tx)| {
            let slow = RawIpTransmitter::open(crate::mux::TX_QUEUE)?;
            Ok((
                AfXdpReceiver { rx },
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
                },
            ))
        })
        .collect::<io::Result<Vec<_>>>()?;
    let steering = Steering {
        vips,
        _xsks: xsks,
        _program: program,
        _link: link,
        resolver,
    };
    Ok((
        devices,
        steering,
        XdpMode {
            attach,
            bind,
            queues: count,
            fallbacks,
        },
    ))
}
