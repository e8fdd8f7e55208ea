//! Batched transmission of whole IP packets on raw sockets with `sendmmsg`.
//!
//! [`RawIpTransmitter`] holds two raw sockets, `socket(AF_INET, SOCK_RAW, IPPROTO_RAW)` and
//! `socket(AF_INET6, SOCK_RAW, IPPROTO_RAW)`. On Linux, protocol `IPPROTO_RAW` implies
//! `IP_HDRINCL` for IPv4, and `inet6_create` sets the same `hdrincl` flag for IPv6 (the
//! `ipv6_packet_is_sent_as_given` test checks that the header sent is exactly ours). Each
//! packet is copied into one arena preallocated at [`RawIpTransmitter::open`], and
//! [`Transmitter::flush`] sends each address family's batch with one `sendmmsg`.
//!
//! **Why raw IP sockets.** The kernel's routing table and neighbour (ARP / NDP) table choose
//! the next hop and its MAC address, exactly as for the host's own traffic: ECMP routes,
//! failover of a next hop, neighbour resolution and its retries all keep working with no code
//! here. The alternative, AF_PACKET TX (or AF_XDP), would need the mux to copy the routing and
//! neighbour tables over netlink, resolve unknown neighbours itself, and handle each change
//! correctly. The cost: every packet goes through the IP output path (route lookup, netfilter
//! `OUTPUT`/`POSTROUTING`, the qdisc), and an skb is allocated per packet, which is slower than
//! writing into a TX ring. It is acceptable because `sendmmsg` still makes one syscall per batch,
//! the route lookup hits the FIB quickly for a few backend addresses, and the mux's budget is
//! dominated by receive and steering; the device traits let a ring-based transmitter replace
//! this one later if measurements say so.
//!
//! **What the kernel does to a packet.** For IPv4 it rewrites the total length and the header
//! checksum (and may fill in a zero ID or a zero source address); IPv6 is sent as given. The
//! destination handed to [`Transmitter::queue`] is what the kernel routes by. A packet larger
//! than the route's MTU fails with `EMSGSIZE`.
//!
//! **Errors, per message.** `sendmmsg` stops at the first message the kernel refuses and
//! returns how many it sent, and the refused message's error is lost. The next `sendmmsg` of
//! the same flush therefore starts at that message: it fails again at once (the errno is then
//! known; the message is counted as failed and skipped) or, if the cause was transient, is sent
//! then. A refused message was not sent, so a message is never sent twice, and no message gets
//! more than that one second attempt. Failures are counted per cause in [`TxErrors`]
//! ([`RawIpTransmitter::errors`], [`RawIpTransmitter::last_error`]). Note: for a raw socket
//! without `IP_RECVERR`, the kernel reports a packet dropped by the qdisc (`ENOBUFS`) as sent.
//!
//! **Backpressure.** The sockets block: when a socket's send buffer is full, `sendmmsg` waits.
//! The buffer is raised to [`SEND_BUFFER`] (with `SO_SNDBUFFORCE`, as root; otherwise
//! `SO_SNDBUF`, capped by `net.core.wmem_max`; failure of both is ignored).
//!
//! **Invariants.** Nothing in `queue` or `flush` allocates. `queue` copies the packet; when
//! the queue holds `capacity` packets or the arena has no room for the new one, it flushes
//! first. A packet that does not fit in the empty arena is sent alone, straight from the
//! caller's buffer, after everything queued before it. Counts of sends made inside `queue` are
//! carried over into the report of the next `flush`, so every packet is reported exactly once.
//! If the IPv6 socket cannot be opened (IPv6 disabled), IPv6 packets count as failed
//! ([`TxErrors::no_socket`]).

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::device::{FlushReport, Transmitter};

/// Arena bytes per packet of capacity: room for a full 1500-byte packet plus encapsulation.
pub const ARENA_BYTES_PER_PACKET: usize = 2048;
/// The send buffer asked for on each socket.
pub const SEND_BUFFER: libc::c_int = 4 << 20;
/// The kernel caps one `sendmmsg` at `UIO_MAXIOV` messages.
const MAX_MESSAGES_PER_CALL: usize = 1024;

/// Failure counts of a [`RawIpTransmitter`], by cause, since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxErrors {
    /// No route or unreachable (`ENETUNREACH`, `EHOSTUNREACH`, `ENETDOWN`, `EHOSTDOWN`).
    pub no_route: u64,
    /// Larger than the route's MTU (`EMSGSIZE`).
    pub too_big: u64,
    /// Out of buffers or memory (`ENOBUFS`, `ENOMEM`, `EAGAIN`).
    pub no_buffers: u64,
    /// Refused by policy (`EPERM`, `EACCES`: netfilter, broadcast).
    pub refused: u64,
    /// Malformed: empty, too short, or its IP version not matching the destination's family
    /// (`EINVAL`, or caught before the kernel).
    pub invalid: u64,
    /// An IPv6 packet while no IPv6 socket could be opened.
    pub no_socket: u64,
    /// Any other error.
    pub other: u64,
    /// The kind of the most recent failure.
    pub last: Option<io::ErrorKind>,
    /// The errno of the most recent failure, 0 if it was not an OS error.
    pub last_errno: i32,
}

impl TxErrors {
    /// Counts one failure with OS error `errno`.
    fn record_errno(&mut self, errno: i32) {
        let counter = match errno {
            libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENETDOWN | libc::EHOSTDOWN => {
                &mut self.no_route
            }
            libc::EMSGSIZE => &mut self.too_big,
            libc::ENOBUFS | libc::ENOMEM | libc::EAGAIN => &mut self.no_buffers,
            libc::EPERM | libc::EACCES => &mut self.refused,
            libc::EINVAL => &mut self.invalid,
            _ => &mut self.other,
        };
        *counter += 1;
        self.last = Some(io::Error::from_raw_os_error(errno).kind());
        self.last_errno = errno;
    }

    /// Counts one failure found before the kernel saw the packet.
    fn record_local(&mut self, invalid: bool) {
        if invalid {
            self.invalid += 1;
            self.last = Some(io::ErrorKind::InvalidInput);
        } else {
            self.no_socket += 1;
            self.last = Some(io::ErrorKind::Unsupported);
        }
        self.last_errno = 0;
    }
}

/// One address family's queued messages: where each packet is in the arena and its
/// destination, plus the `iovec` / `mmsghdr` arrays `sendmmsg` reads, all of `capacity`.
#[derive(Debug)]
struct Batch<A> {
    /// Messages queued.
    len: usize,
    /// (offset in the arena, length) of each queued packet.
    spans: Vec<(usize, usize)>,
    /// Each packet's destination.
    addresses: Vec<A>,
    /// Filled in just before sending, from `spans`.
    iovecs: Vec<libc::iovec>,
    /// Filled in just before sending, pointing into `addresses` and `iovecs`.
    messages: Vec<libc::mmsghdr>,
}

impl<A: Copy> Batch<A> {
    /// An empty batch with room for `capacity` messages, allocated now.
    fn new(capacity: usize, blank: A) -> Self {
        let iovec = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: `mmsghdr` is plain old data (integers and pointers); all-zero bytes are a
        // valid value (null pointers, zero lengths).
        let message: libc::mmsghdr = unsafe { mem::zeroed() };
        Self {
            len: 0,
            spans: vec![(0, 0); capacity],
            addresses: vec![blank; capacity],
            iovecs: vec![iovec; capacity],
            messages: vec![message; capacity],
        }
    }

    /// Appends a message; the caller checked there is room.
    fn push(&mut self, offset: usize, length: usize, address: A) {
        if let (Some(span), Some(slot)) = (
            self.spans.get_mut(self.len),
            self.addresses.get_mut(self.len),
        ) {
            *span = (offset, length);
            *slot = address;
            self.len += 1;
        }
    }

    /// Points the queued messages at their bytes (`base` + offset) and destinations, sends
    /// them on `fd`, counts the outcome, and empties the batch.
    ///
    /// `base` must be valid for reads of every queued span and not be written during the call.
    fn send(&mut self, fd: &OwnedFd, base: *const u8, errors: &mut TxErrors) -> FlushReport {
        let count = self.len;
        self.len = 0;
        let mut report = FlushReport::default();
        if count == 0 {
            return report;
        }
        for (iovec, &(offset, length)) in self.iovecs.iter_mut().zip(&self.spans).take(count) {
            iovec.iov_base = base.wrapping_add(offset).cast_mut().cast();
            iovec.iov_len = length;
        }
        let name_len = size_of::<A>() as libc::socklen_t;
        let addresses = self.addresses.as_mut_ptr();
        let iovecs = self.iovecs.as_mut_ptr();
        for (index, message) in self.messages.iter_mut().enumerate().take(count) {
            let header = &mut message.msg_hdr;
            header.msg_name = addresses.wrapping_add(index).cast();
            header.msg_namelen = name_len;
            header.msg_iov = iovecs.wrapping_add(index);
            header.msg_iovlen = 1;
            header.msg_control = std::ptr::null_mut();
            header.msg_controllen = 0;
            header.msg_flags = 0;
            message.msg_len = 0;
        }
        let messages = self.messages.as_mut_ptr();
        let mut next = 0;
        while next < count {
            let chunk = (count - next).min(MAX_MESSAGES_PER_CALL);
            // SAFETY: messages `next..next + chunk` are initialised above (`chunk <= count <=
            // capacity`); each points at its own `sockaddr` in `addresses` (of `name_len`
            // bytes) and one `iovec` in `iovecs`, which points at `length` readable bytes
            // from `base` (the caller's contract). None of these buffers is touched by Rust
            // during the call; the kernel writes only `msg_len`. `chunk <= 1024` fits `c_uint`.
            let sent = unsafe {
                libc::sendmmsg(fd.as_raw_fd(), messages.add(next), chunk as libc::c_uint, 0)
            };
            match usize::try_from(sent) {
                Ok(sent) if sent > 0 => {
                    // If `sent < chunk`, message `next + sent` was refused; the next call
                    // starts there and tells why (see the module docs).
                    let sent = sent.min(chunk);
                    report.sent += sent as u64;
                    next += sent;
                }
                Ok(_) => {
                    // Zero sent and no error: should not happen; never loop on it.
                    errors.record_errno(0);
                    report.failed += 1;
                    next += 1;
                }
                Err(_) => {
                    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
                    if errno == libc::EINTR {
                        continue;
                    }
                    errors.record_errno(errno);
                    report.failed += 1;
                    next += 1;
                }
            }
        }
        report
    }
}

/// Adds `more` to `total`.
fn add(total: &mut FlushReport, more: FlushReport) {
    total.sent += more.sent;
    total.failed += more.failed;
}

/// Opens `socket(family, SOCK_RAW, IPPROTO_RAW)` and sets its send buffer.
fn raw_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let size = SEND_BUFFER;
    let len = size_of::<libc::c_int>() as libc::socklen_t;
    for option in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
        // SAFETY: `size` is a readable `c_int` of `len` bytes; the fd is valid.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&size).cast(),
                len,
            )
        };
        if rc == 0 {
            break;
        }
    }
    Ok(fd)
}

/// Transmits whole IP packets through the kernel's IP output path, in `sendmmsg` batches. See
/// the module docs.
#[derive(Debug)]
pub struct RawIpTransmitter {
    /// `AF_INET`, `IPPROTO_RAW` (header included).
    v4: OwnedFd,
    /// `AF_INET6`, `IPPROTO_RAW` (header included); `None` when IPv6 is unavailable.
    v6: Option<OwnedFd>,
    /// Most packets queued at once.
    capacity: usize,
    /// The queued packets' bytes, both families, back to back.
    arena: Vec<u8>,
    /// Bytes of `arena` in use.
    used: usize,
    /// Queued IPv4 packets.
    batch_v4: Batch<libc::sockaddr_in>,
    /// Queued IPv6 packets.
    batch_v6: Batch<libc::sockaddr_in6>,
    /// Outcome of sends made inside `queue`, reported by the next `flush`.
    carried: FlushReport,
    /// Failures by cause.
    errors: TxErrors,
}

// SAFETY: the only non-`Send` fields are the raw pointers inside the `iovec` / `mmsghdr`
// scratch arrays. They point only into buffers owned by this same value (or, during one call,
// the caller's packet), are rewritten before every use and never dereferenced by Rust, so moving
// the transmitter to another thread shares nothing.
unsafe impl Send for RawIpTransmitter {}

/// The destination as a `sockaddr_in` (port 0: raw sockets ignore it).
fn sockaddr_v4(address: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(address.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// The destination as a `sockaddr_in6` (port 0, no flow label, no scope: backends are
/// addressed by global addresses).
fn sockaddr_v6(address: Ipv6Addr) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: 0,
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr {
            s6_addr: address.octets(),
        },
        sin6_scope_id: 0,
    }
}

impl RawIpTransmitter {
    /// Opens the raw sockets and preallocates room for `capacity` packets: an arena of
    /// `capacity * ARENA_BYTES_PER_PACKET` bytes and the per-family message arrays. Larger
    /// packets (up to the IP maximum) still work: see the module docs.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for `capacity` 0 or too large; the OS error if the IPv4 raw socket
    /// cannot be opened (not root: `PermissionDenied`). A failing IPv6 socket is tolerated.
    pub fn open(capacity: usize) -> io::Result<Self> {
        let arena_len = capacity.checked_mul(ARENA_BYTES_PER_PACKET);
        let arena_len = match arena_len {
            Some(len) if capacity > 0 && isize::try_from(len).is_ok() => len,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("raw IP transmitter: bad capacity {capacity}"),
                ));
            }
        };
        let v4 = raw_socket(libc::AF_INET).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("raw IP transmitter: socket(AF_INET, SOCK_RAW, IPPROTO_RAW): {e}"),
            )
        })?;
        let v6 = match raw_socket(libc::AF_INET6) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "raw IP transmitter: no IPv6 raw socket; IPv6 packets will count as failed"
                );
                None
            }
        };
        Ok(Self {
            v4,
            v6,
            capacity,
            arena: vec![0; arena_len],
            used: 0,
            batch_v4: Batch::new(capacity, sockaddr_v4(Ipv4Addr::UNSPECIFIED)),
            batch_v6: Batch::new(capacity, sockaddr_v6(Ipv6Addr::UNSPECIFIED)),
            carried: FlushReport::default(),
            errors: TxErrors::default(),
        })
    }

    /// Sets `SO_MARK` (the firewall mark policy-routing rules can match) on both sockets, so the
    /// packets sent from here can be told apart from the host's own by `ip rule fwmark`. The
    /// agent marks its transmitters so that its egress-steering rules leave them alone.
    ///
    /// # Errors
    ///
    /// The OS error of `setsockopt` (`EPERM` without `CAP_NET_ADMIN`).
    pub fn set_mark(&mut self, mark: u32) -> io::Result<()> {
        for fd in std::iter::once(&self.v4).chain(self.v6.as_ref()) {
            // SAFETY: `mark` is a readable `u32`, the option's type, for the whole call; the fd
            // is one of ours.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    std::ptr::from_ref(&mark).cast(),
                    size_of::<u32>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("raw IP transmitter: SO_MARK {mark:#x}: {e}"),
                ));
            }
        }
        Ok(())
    }

    /// Failure counts by cause since `open` (the last one's kind and errno included).
    #[must_use]
    pub fn errors(&self) -> TxErrors {
        self.errors
    }

    /// The kind of the most recent failure, if any.
    #[must_use]
    pub fn last_error(&self) -> Option<io::ErrorKind> {
        self.errors.last
    }

    /// Whether IPv6 packets can be sent (the IPv6 raw socket opened).
    #[must_use]
    pub fn has_ipv6(&self) -> bool {
        self.v6.is_some()
    }

    /// Sends everything queued, both families, and empties the arena.
    fn send_queued(&mut self) -> FlushReport {
        let base = self.arena.as_ptr();
        let mut report = self.batch_v4.send(&self.v4, base, &mut self.errors);
        if let Some(v6) = &self.v6 {
            add(&mut report, self.batch_v6.send(v6, base, &mut self.errors));
        }
        self.used = 0;
        report
    }
}

impl Transmitter for RawIpTransmitter {
    fn queue(&mut self, packet: &[u8], destination: IpAddr) -> io::Result<()> {
        let version = packet.first().map(|b| b >> 4);
        let matches_family = match destination {
            IpAddr::V4(_) => version == Some(4) && packet.len() >= 20,
            IpAddr::V6(_) => version == Some(6) && packet.len() >= 40,
        };
        if !matches_family {
            self.errors.record_local(true);
            self.carried.failed += 1;
            return Ok(());
        }
        if destination.is_ipv6() && self.v6.is_none() {
            self.errors.record_local(false);
            self.carried.failed += 1;
            return Ok(());
        }
        if packet.len() > self.arena.len() {
            // Too big for the arena even when empty: send what is queued (order), then this
            // packet alone, straight from the caller's buffer.
            let report = self.send_queued();
            add(&mut self.carried, report);
            let report = match destination {
                IpAddr::V4(address) => {
                    self.batch_v4.push(0, packet.len(), sockaddr_v4(address));
                    self.batch_v4
                        .send(&self.v4, packet.as_ptr(), &mut self.errors)
                }
                IpAddr::V6(address) => match &self.v6 {
                    Some(v6) => {
                        self.batch_v6.push(0, packet.len(), sockaddr_v6(address));
                        self.batch_v6.send(v6, packet.as_ptr(), &mut self.errors)
                    }
                    None => FlushReport::default(), // excluded above
                },
            };
            add(&mut self.carried, report);
            return Ok(());
        }
        if self.queued() >= self.capacity || self.arena.len() - self.used < packet.len() {
            let report = self.send_queued();
            add(&mut self.carried, report);
        }
        let offset = self.used;
        let Some(slot) = self.arena.get_mut(offset..offset + packet.len()) else {
            // Unreachable: room was made above. Count rather than panic.
            self.errors.record_local(true);
            self.carried.failed += 1;
            return Ok(());
        };
        slot.copy_from_slice(packet);
        self.used += packet.len();
        match destination {
            IpAddr::V4(address) => self
                .batch_v4
                .push(offset, packet.len(), sockaddr_v4(address)),
            IpAddr::V6(address) => self
                .batch_v6
                .push(offset, packet.len(), sockaddr_v6(address)),
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<FlushReport> {
        let mut report = mem::take(&mut self.carried);
        add(&mut report, self.send_queued());
        Ok(report)
    }

    fn queued(&self) -> usize {
        self.batch_v4.len + self.batch_v6.len
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use etherparse::PacketBuilder;
    use lb_core::encap::{EncapKind, EncapParams, encapsulate};

    use super::*;
    use crate::afpacket::testns::in_private_netns;

    /// An IPv4/UDP packet 127.0.0.1:1000 -> 127.0.0.3:2000 with `payload_len` bytes, the first
    /// four holding `seq`.
    fn inner_udp(seq: u32, payload_len: usize) -> Vec<u8> {
        let mut payload = vec![0xa5; payload_len.max(4)];
        payload[..4].copy_from_slice(&seq.to_be_bytes());
        let builder = PacketBuilder::ipv4([127, 0, 0, 1], [127, 0, 0, 3], 64).udp(1000, 2000);
        let mut out = Vec::with_capacity(builder.size(payload.len()));
        builder.write(&mut out, &payload).expect("build inner");
        out
    }

    /// `inner` in IP-in-IP from `src` to `dst`.
    fn ipip(inner: &[u8], src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let params = EncapParams {
            outer_src: src,
            outer_dst: dst,
            ttl: 64,
            kind: EncapKind::Ipip,
        };
        let mut out = vec![0; inner.len() + 40];
        let len = encapsulate(inner, &params, &mut out).expect("encapsulate");
        out.truncate(len);
        out
    }

    /// A raw socket of `family` for IP protocol 4, with a large receive buffer and a 200 ms
    /// receive time-out.
    fn protocol4_listener(family: libc::c_int) -> OwnedFd {
        // SAFETY: plain socket(2) call; checked below.
        let raw = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 4) };
        assert!(raw >= 0, "socket(raw, 4): {}", io::Error::last_os_error());
        // SAFETY: fresh descriptor, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size: libc::c_int = 16 << 20;
        // SAFETY: valid fd; `size` is a readable c_int.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                std::ptr::from_ref(&size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: valid fd; `timeout` is a readable timeval.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
        fd
    }

    /// Everything `fd` receives until it has `want` packets or 3 s pass (then a short grace
    /// period to catch extras).
    fn receive_all(fd: &OwnedFd, want: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            // SAFETY: `buf` is writable for its length; valid fd.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            match usize::try_from(n) {
                Ok(n) => got.push(buf[..n].to_vec()),
                Err(_) if got.len() >= want => break, // time-out after the last one
                Err(_) => {}
            }
        }
        got
    }

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::from(a)
    }

    #[test]
    fn open_rejects_zero_capacity() {
        assert_eq!(
            RawIpTransmitter::open(0).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn ipip_batch_reaches_local_protocol_4_socket() {
        in_private_netns(|| {
            const N: u32 = 1500; // more than one sendmmsg call (1024) per flush
            let listener = protocol4_listener(libc::AF_INET);
            let mut tx = RawIpTransmitter::open(2048).expect("open");
            let dst = v4([127, 0, 0, 2]);
            let inners: Vec<Vec<u8>> = (0..N).map(|seq| inner_udp(seq, 32)).collect();
            for inner in &inners {
                tx.queue(&ipip(inner, v4([127, 0, 0, 1]), dst), dst)
                    .expect("queue");
            }
            assert_eq!(tx.queued(), N as usize);
            let report = tx.flush().expect("flush");
            assert_eq!(
                report,
                FlushReport {
                    sent: u64::from(N),
                    failed: 0
                }
            );
            assert_eq!(tx.queued(), 0);
            let got = receive_all(&listener, N as usize);
            assert_eq!(got.len(), N as usize);
            for (packet, inner) in got.iter().zip(&inners) {
                assert_eq!(packet[9], 4, "outer protocol IP-in-IP");
                assert_eq!(&packet[16..20], &[127, 0, 0, 2]);
                assert_eq!(&packet[20..], &inner[..], "inner packet intact, in order");
            }
            assert_eq!(tx.last_error(), None);
        });
    }

    #[test]
    fn unroutable_packet_in_the_middle_fails_alone() {
        in_private_netns(|| {
            let listener = protocol4_listener(libc::AF_INET);
            let mut tx = RawIpTransmitter::open(16).expect("open");
            let good = v4([127, 0, 0, 2]);
            // No route to 198.18.99.1 in a namespace with only `lo`.
            let bad = v4([198, 18, 99, 1]);
            let destinations = [good, good, bad, good, good, bad];
            for (seq, &dst) in (0u32..).zip(&destinations) {
                tx.queue(&ipip(&inner_udp(seq, 16), v4([127, 0, 0, 1]), dst), dst)
                    .expect("queue");
            }
            let report = tx.flush().expect("flush");
            assert_eq!(report, FlushReport { sent: 4, failed: 2 });
            assert_eq!(tx.last_error(), Some(io::ErrorKind::NetworkUnreachable));
            assert_eq!(tx.errors().no_route, 2);
            assert_eq!(tx.errors().last_errno, libc::ENETUNREACH);
            let got = receive_all(&listener, 4);
            let seqs: Vec<u32> = got
                .iter()
                .map(|p| u32::from_be_bytes(p[48..52].try_into().unwrap()))
                .collect();
            assert_eq!(seqs, vec![0, 1, 3, 4]);

            // A packet whose version does not match its destination never reaches the kernel.
            tx.queue(&inner_udp(9, 16), "::1".parse().unwrap())
                .expect("queue");
            tx.queue(&[], good).expect("queue");
            assert_eq!(
                tx.flush().expect("flush"),
                FlushReport { sent: 0, failed: 2 }
            );
            assert_eq!(tx.errors().invalid, 2);
        });
    }

    #[test]
    fn full_arena_flushes_and_oversized_packets_go_alone() {
        in_private_netns(|| {
            let listener = protocol4_listener(libc::AF_INET);
            // Arena: 4 * 2048 bytes. 3000-byte packets fit two at a time; 30000-byte ones
            // never fit and are sent alone.
            let mut tx = RawIpTransmitter::open(4).expect("open");
            let dst = v4([127, 0, 0, 2]);
            let sizes = [
                3000, 3000, 3000, 30_000, 3000, 60_000, 100, 100, 100, 100, 100,
            ];
            let mut inners = Vec::new();
            for (seq, &size) in (0u32..).zip(&sizes) {
                let inner = inner_udp(seq, size);
                tx.queue(&ipip(&inner, v4([127, 0, 0, 1]), dst), dst)
                    .expect("queue");
                assert!(tx.queued() <= 4);
                inners.push(inner);
            }
            let report = tx.flush().expect("flush");
            assert_eq!(
                report,
                FlushReport {
                    sent: sizes.len() as u64,
                    failed: 0
                }
            );
            let got = receive_all(&listener, sizes.len());
            assert_eq!(got.len(), sizes.len());
            for (packet, inner) in got.iter().zip(&inners) {
                assert_eq!(&packet[20..], &inner[..], "in order, intact");
            }
            // Over the IP maximum: the kernel refuses it, counted, nothing panics.
            let mut huge = vec![0u8; 65_537];
            huge[0] = 0x45;
            huge[9] = 4;
            huge[12..16].copy_from_slice(&[127, 0, 0, 1]);
            huge[16..20].copy_from_slice(&[127, 0, 0, 2]);
            tx.queue(&huge, dst).expect("queue");
            assert_eq!(
                tx.flush().expect("flush"),
                FlushReport { sent: 0, failed: 1 }
            );
            assert_eq!(tx.errors().last_errno, libc::EMSGSIZE);
            assert_eq!(tx.errors().too_big, 1, "{:?}", tx.errors());
        });
    }

    #[test]
    fn ipv6_packet_is_sent_as_given() {
        in_private_netns(|| {
            let loopback6: IpAddr = "::1".parse().unwrap();
            if std::net::UdpSocket::bind(SocketAddr::new(loopback6, 0)).is_err() {
                eprintln!("skipping the IPv6 part: ::1 is not usable in the namespace");
                return;
            }
            let listener = protocol4_listener(libc::AF_INET6);
            let mut tx = RawIpTransmitter::open(8).expect("open");
            assert!(tx.has_ipv6(), "IPv6 raw socket");
            let inners: Vec<Vec<u8>> = (0..3).map(|seq| inner_udp(seq, 20)).collect();
            // Larger than lo's MTU (65536): the kernel refuses it with EMSGSIZE. It is too big
            // for the arena, so it also goes out alone, after the two queued before it.
            let too_big = ipip(&inner_udp(3, 65_500), loopback6, loopback6);
            assert!(too_big.len() > 65_536);
            tx.queue(&ipip(&inners[0], loopback6, loopback6), loopback6)
                .expect("queue");
            tx.queue(&ipip(&inners[1], loopback6, loopback6), loopback6)
                .expect("queue");
            tx.queue(&too_big, loopback6).expect("queue");
            tx.queue(&ipip(&inners[2], loopback6, loopback6), loopback6)
                .expect("queue");
            let report = tx.flush().expect("flush");
            // IPv6 raw sockets deliver the payload without the IPv6 header. That our own
            // next-header (4) selected this socket and the payload is exactly the inner
            // packet shows the kernel sent our header, not one of its own (hdrincl).
            let got = receive_all(&listener, 3);
            assert_eq!(
                got, inners,
                "payloads are exactly the inner packets, in order"
            );
            assert_eq!(report, FlushReport { sent: 3, failed: 1 });
            assert_eq!(tx.errors().too_big, 1, "{:?}", tx.errors());
            assert_eq!(tx.errors().last_errno, libc::EMSGSIZE);
        });
    }
}
