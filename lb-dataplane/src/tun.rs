//! A TUN device (`IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`): the backend agent writes decapsulated
//! inner IP packets into the kernel through it, and reads the packets the kernel routes into it.
//!
//! **Why a TUN.** The agent receives IP-in-IP and GRE packets from the muxes and must hand the
//! inner packet to the local TCP stack as if it had arrived from the client. In production the
//! kernel's own `ipip` / `gre` devices do exactly that, without user space; this lab's kernel
//! has neither (and no modules can be loaded), so the agent decapsulates in user space (an
//! AF_PACKET ring; raw sockets for protocols 4, 41 and 47 keep the kernel quiet) and injects the
//! inner packet with a write on a TUN. A write on a TUN file descriptor is received by the
//! kernel as if the packet had arrived on the device: `ip_rcv` / `ipv6_rcv`, then the route
//! lookup, netfilter `PREROUTING` / `INPUT` and local delivery. With `IFF_NO_PI` the packets
//! are bare IPv4 or IPv6 (the kernel picks the protocol from the version nibble and refuses
//! anything else with `EINVAL`).
//!
//! **The virtio-net header and offloads.** Every read and write carries a 10-byte
//! `virtio_net_hdr` in front of the packet (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ` 10; layout and
//! meaning in [`crate::vnet`]). Writing: a header with `GSO_TCPV4`/`GSO_TCPV6` hands the kernel
//! one TCP super-packet of up to 64 KiB that stands for many segments, and the kernel delivers
//! it to the socket as one packet, as it does with its own GRO; [`crate::coalesce`] builds them,
//! [`Tun::write_frame`] writes them. This needs only `IFF_VNET_HDR`. Reading: with
//! [`Tun::enable_offloads`] (`TUNSETOFFLOAD` `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`, as
//! wireguard-go and tailscale set it) the kernel skips segmentation and checksumming for what
//! it routes into the device, and a read may return a TCP GSO packet of up to 64 KiB or a
//! packet whose checksum is partial. The agent's egress SNAT path reads those and must send
//! wire packets on raw sockets, so it cuts them up and completes the checksums itself
//! ([`crate::vnet::split_tcp`], [`crate::vnet::complete_checksum`]): one read, one lock of the
//! SNAT tables and one `sendmmsg` per 64 KiB instead of per segment. `TUN_F_TSO_ECN` and the
//! UDP offloads stay off, so the kernel still segments those itself. A kernel that refuses
//! `TUNSETOFFLOAD` leaves plain packets (header "no GSO"), which the same path handles.
//!
//! **Cost: one syscall per write, not per packet.** [`Tun::write_frame`] and
//! [`Tun::write_packet`] are one `write(2)`/`writev(2)` each, [`Tun::read_packet`] one
//! `readv(2)` (plus a `poll` when nothing is queued). A TUN has no batched write (`sendmmsg`
//! does not exist for a character device; only vhost-net or io_uring would batch), so the agent
//! cuts the number of writes instead: a batch's TCP segments of one flow become one write. A
//! bulk TCP flow then costs one write per up to 64 KiB; what cannot be coalesced (SYNs, pure
//! ACKs, UDP, interleaved small packets) still costs one write each. A production deployment
//! would use the kernel's own `ipip` / `gre` decapsulation (with GRO) instead of this module.
//!
//! **Settings the host needs** (each seen failing without it):
//! - `rp_filter` **0 on the TUN and on `all`**. The effective value is the maximum of the two,
//!   and the TUN has no IPv4 address, so with any non-zero value (strict *or* loose) the
//!   kernel's source validation ends in its "device without address" branch and drops every
//!   packet whose source is routed via another interface (the clients, normally). The test
//!   `rp_filter_must_be_zero_for_injection` shows it.
//! - The VIP on `lo` (as a /32): the injected packet's destination is the VIP, and only a local
//!   address gets it delivered rather than forwarded (or dropped, with `ip_forward` 0).
//! - The device up (`bring_up`), so the kernel accepts packets on it and routes into it.
//!
//! **Lifetime.** The device is not made persistent: it exists while this value (its file
//! descriptor) is open and disappears when it is dropped, together with its routes. Opening a
//! name that already is a TUN device attaches to it (`EBUSY` if another descriptor holds it);
//! a name taken by another kind of device fails with `EINVAL`. The device is created in the
//! network namespace of the calling thread.
//!
//! **Queues.** One queue: `IFF_MULTI_QUEUE` is not used. Writes from several threads on one
//! descriptor are each one whole packet (the kernel processes a write as one packet), and one
//! thread writes (the receive loop) while another reads (egress). Several queues would only
//! matter to spread the kernel's transmit side over CPUs.
//!
//! **Invariants.** Every read and write carries the virtio-net header; the descriptor is
//! non-blocking; `read_packet` waits with `poll` and never blocks past its time-out. Nothing
//! allocates after [`Tun::open`]. Every error names the
//! device and the step (`TUN tun0: TUNSETIFF: Operation not permitted`).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::vnet::{VNET_HDR_LEN, VnetHeader};

/// The TUN clone device.
const CLONE_DEVICE: &std::ffi::CStr = c"/dev/net/tun";

/// An open TUN device (`IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`, one queue). See the module docs.
#[derive(Debug)]
pub struct Tun {
    /// The `/dev/net/tun` descriptor attached to the device, non-blocking.
    fd: OwnedFd,
    /// The device's name as the kernel reports it (a `%d` template resolved).
    name: Box<str>,
}

/// Wraps `err` with the device and the step that failed.
fn context(name: &str, step: &str, err: &io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("TUN {name}: {step}: {err}"))
}

/// An `ifreq` naming `name`, or `None` if the name is empty, does not fit or holds a NUL.
fn ifreq_for(name: &str) -> Option<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    // SAFETY: `ifreq` is plain old data (a name array and a union of plain structs), for which
    // all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = src.cast_signed();
    }
    Some(req)
}

/// The NUL-terminated name in `req`, as a string.
fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c.cast_unsigned())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Sets `IFF_UP` on the device `req` names, through an `AF_INET` datagram socket (the TUN
/// descriptor itself does not take `SIOC[GS]IFFLAGS`).
fn bring_up(name: &str, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(context(
            name,
            "socket for SIOCSIFFLAGS",
            &io::Error::last_os_error(),
        ));
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `req` is a valid, writable `ifreq` with a NUL-terminated name; SIOCGIFFLAGS
    // writes only `ifru_flags` inside it.
    let rc = unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            libc::SIOCGIFFLAGS,
            std::ptr::from_mut(req),
        )
    };
    if rc != 0 {
        return Err(context(name, "SIOCGIFFLAGS", &io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so `ifru_flags` is the union member the kernel wrote.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: as above; SIOCSIFFLAGS only reads the `ifreq`.
    let rc = unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            libc::SIOCSIFFLAGS,
            std::ptr::from_mut(req),
        )
    };
    if rc != 0 {
        return Err(context(
            name,
            "SIOCSIFFLAGS IFF_UP",
            &io::Error::last_os_error(),
        ));
    }
    Ok(())
}

impl Tun {
    /// Opens (creating if needed) the TUN device `name` (`IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`:
    /// packets are bare IPv4/IPv6 behind a virtio-net header of [`VNET_HDR_LEN`] bytes), and
    /// sets it up (`IFF_UP`) if `bring_up`. Offloads stay off until [`Tun::enable_offloads`].
    /// `name` may be a template such as `tun%d`; [`Tun::name`] then tells the name the kernel
    /// chose.
    ///
    /// Steps, in order: open `/dev/net/tun` (non-blocking), `TUNSETIFF`, `TUNSETVNETHDRSZ`, then
    /// `SIOCGIFFLAGS` / `SIOCSIFFLAGS` on an `AF_INET` socket when bringing it up. Needs
    /// `CAP_NET_ADMIN`.
    ///
    /// # Errors
    ///
    /// Any failing step, as an [`io::Error`] whose message names the device and the step
    /// (`TUN t0: TUNSETIFF: Operation not permitted` without root, `Invalid argument` when the
    /// name belongs to a device that is not a TUN); `InvalidInput` for an empty name, one of
    /// `IFNAMSIZ` (16) bytes or more, or one holding a NUL.
    pub fn open(name: &str, bring_up: bool) -> io::Result<Tun> {
        let Some(mut req) = ifreq_for(name) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TUN {name}: bad device name (1 to 15 bytes, no NUL)"),
            ));
        };
        // SAFETY: `CLONE_DEVICE` is a NUL-terminated path; the result is checked before use.
        let raw = unsafe {
            libc::open(
                CLONE_DEVICE.as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if raw < 0 {
            return Err(context(
                name,
                "open /dev/net/tun",
                &io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Writing a union field of plain data needs no unsafe; the kernel reads `ifru_flags`.
        req.ifr_ifru.ifru_flags =
            (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: `req` is a valid, writable `ifreq` with a NUL-terminated name; TUNSETIFF
        // reads it and writes the final device name back into it, nothing outside.
        let rc = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETIFF,
                std::ptr::from_mut(&mut req),
            )
        };
        if rc != 0 {
            return Err(context(name, "TUNSETIFF", &io::Error::last_os_error()));
        }
        let actual = ifreq_name(&req);
        let size = libc::c_int::try_from(VNET_HDR_LEN).unwrap_or(libc::c_int::MAX);
        // SAFETY: TUNSETVNETHDRSZ reads one `c_int` through the pointer during the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &raw const size) };
        if rc != 0 {
            return Err(context(
                &actual,
                "TUNSETVNETHDRSZ",
                &io::Error::last_os_error(),
            ));
        }
        if bring_up {
            // A fresh request: the union of `req` now holds what TUNSETIFF left there.
            let Some(mut up) = ifreq_for(&actual) else {
                return Err(io::Error::other(format!(
                    "TUN {name}: TUNSETIFF returned a bad name {actual:?}"
                )));
            };
            self::bring_up(&actual, &mut up)?;
        }
        Ok(Tun {
            fd,
            name: actual.into_boxed_str(),
        })
    }

    /// The device's name, as the kernel reports it.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Turns on the offloads the kernel may use for packets it routes *into* the device
    /// (`TUNSETOFFLOAD`): `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6`. [`Tun::read_packet`] may
    /// then return TCP packets of up to 64 KiB with a GSO header, and packets whose transport
    /// checksum is partial; [`crate::vnet::split_tcp`] and [`crate::vnet::complete_checksum`]
    /// turn them back into wire packets. Writing GSO packets ([`Tun::write_frame`]) needs
    /// only `IFF_VNET_HDR`, which [`Tun::open`] always sets.
    ///
    /// # Errors
    ///
    /// The kernel's refusal, naming the device and the step.
    pub fn enable_offloads(&self) -> io::Result<()> {
        let flags = libc::c_ulong::from(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6);
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the descriptor is valid.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags) };
        if rc != 0 {
            return Err(context(
                &self.name,
                "TUNSETOFFLOAD",
                &io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Writes one IP packet into the kernel (it is received as if it arrived on the device),
    /// behind a virtio-net header saying "no GSO, checksums complete". One `writev(2)`; the
    /// packet's first nibble (4 or 6) tells the kernel its protocol.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for an empty packet; the kernel's error otherwise, naming the device and
    /// the step (`EINVAL` for a version nibble other than 4 or 6; `EIO` when the device is
    /// down). A packet the kernel accepts but then drops (bad checksum, `rp_filter`, no
    /// route, a full backlog) is not an error here: the kernel's counters show it.
    pub fn write_packet(&self, packet: &[u8]) -> io::Result<()> {
        if packet.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TUN {}: write: empty packet", self.name),
            ));
        }
        let header = VnetHeader::NONE.to_bytes();
        let parts = [
            libc::iovec {
                iov_base: header.as_ptr().cast_mut().cast(),
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: packet.as_ptr().cast_mut().cast(),
                iov_len: packet.len(),
            },
        ];
        self.write_parts(&parts, header.len() + packet.len())
    }

    /// Writes one frame: a virtio-net header ([`VNET_HDR_LEN`] bytes, see [`crate::vnet`])
    /// followed by an IP packet, possibly a GSO super-packet. One `write(2)`.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for a frame without a packet after the header; the kernel's error
    /// otherwise (`EINVAL` also for a header the kernel refuses), naming the device.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        if frame.len() <= VNET_HDR_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("TUN {}: write: empty packet", self.name),
            ));
        }
        let parts = [libc::iovec {
            iov_base: frame.as_ptr().cast_mut().cast(),
            iov_len: frame.len(),
        }];
        self.write_parts(&parts, frame.len())
    }

    /// One `writev` of `parts` (`total` bytes), retried on `EINTR`.
    fn write_parts(&self, parts: &[libc::iovec], total: usize) -> io::Result<()> {
        let count = libc::c_int::try_from(parts.len()).unwrap_or(libc::c_int::MAX);
        loop {
            // SAFETY: every iovec points at memory readable for its length for the duration
            // of the call (borrowed by the caller); the kernel only reads it. The descriptor
            // is valid (owned by `self`).
            let n = unsafe { libc::writev(self.fd.as_raw_fd(), parts.as_ptr(), count) };
            match usize::try_from(n) {
                Ok(n) if n == total => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "TUN {}: write: short write, {n} of {total} bytes",
                        self.name
                    )));
                }
                Err(_) => {
                    let err = io::Error::last_os_error();
                    if err.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(context(&self.name, "write", &err));
                }
            }
        }
    }

    /// Reads one packet the kernel routed into the device (for SNAT egress), waiting up to
    /// `timeout`; `Ok(None)` on timeout. Returns the packet's virtio-net header and length (the
    /// packet itself is in `buf`). Tries a `readv` first and polls only when nothing is queued.
    ///
    /// `buf` should hold the largest packet: the device's MTU, or 65 535 bytes once
    /// [`Tun::enable_offloads`] lets the kernel hand over GSO packets. A longer packet is
    /// truncated silently: the kernel copies what fits, returns that length and discards the
    /// rest (the IP header's length field is then larger than the length returned; a test
    /// checks this). A read shorter than the header is returned as a packet of length 0.
    ///
    /// # Errors
    ///
    /// A failing `read` or `poll`, naming the device and the step.
    pub fn read_packet(
        &self,
        buf: &mut [u8],
        timeout: Duration,
    ) -> io::Result<Option<(VnetHeader, usize)>> {
        // `None` (a time-out too large for `Instant`): wait without a bound.
        let deadline = Instant::now().checked_add(timeout);
        let mut header = [0u8; VNET_HDR_LEN];
        loop {
            let parts = [
                libc::iovec {
                    iov_base: header.as_mut_ptr().cast(),
                    iov_len: header.len(),
                },
                libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                },
            ];
            // SAFETY: both iovecs point at memory writable for their lengths for the duration
            // of the call (`header` and `buf`, borrowed here); the descriptor is valid.
            let n = unsafe { libc::readv(self.fd.as_raw_fd(), parts.as_ptr(), 2) };
            if let Ok(n) = usize::try_from(n) {
                let len = n.saturating_sub(VNET_HDR_LEN);
                return Ok(Some((VnetHeader::from_bytes(&header), len)));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {}
                _ => return Err(context(&self.name, "read", &err)),
            }
            let millis = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    // Round up, so a sub-millisecond remainder sleeps instead of spinning.
                    libc::c_int::try_from(left.as_nanos().div_ceil(1_000_000))
                        .unwrap_or(libc::c_int::MAX)
                }
                None => -1,
            };
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one valid, writable `pollfd`.
            let rc = unsafe { libc::poll(&raw mut pfd, 1, millis) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(context(&self.name, "poll", &err));
                }
            }
            // Readable, interrupted or timed out: the next `read` (or the deadline) decides.
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};

    use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

    use super::*;
    use crate::afpacket::testns::in_private_netns;
    use crate::sockdiag::{SockDiag, state};

    /// The test's VIP, put on `lo` as a /32.
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
    /// The (absent) client the injected packets come from.
    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);

    /// Writes `value` to `/proc/sys/net/...`, which is per network namespace: the calling
    /// thread's (the proc sysctl lookup uses the current task's namespace).
    fn sysctl(path: &str, value: &str) {
        let full = format!("/proc/sys/net/{path}");
        std::fs::write(&full, value).unwrap_or_else(|e| panic!("write {full}: {e}"));
        let back = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {full}: {e}"));
        assert_eq!(back.trim(), value, "{full}");
    }

    /// `rp_filter` for `all` and the device `name`.
    fn rp_filter(name: &str, all: u8, device: u8) {
        sysctl("ipv4/conf/all/rp_filter", &all.to_string());
        sysctl(&format!("ipv4/conf/{name}/rp_filter"), &device.to_string());
    }

    /// A `sockaddr` holding `address` (port 0), as the routing and address ioctls take it.
    fn sockaddr(address: Ipv4Addr) -> libc::sockaddr {
        let inet = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(address.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `sockaddr_in` and `sockaddr` are both 16 bytes of plain data; this is the
        // reinterpretation the socket API defines.
        unsafe { mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
    }

    /// An `AF_INET` datagram socket for the address and route ioctls.
    fn ioctl_socket() -> OwnedFd {
        // SAFETY: plain socket(2) call; checked below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: fresh descriptor, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(raw) }
    }

    /// Adds `address`/32 on `lo` with the old ioctls: `SIOCSIFADDR` on the alias `lo:<n>` adds
    /// a new address (on `lo` itself it would replace 127.0.0.1), `SIOCSIFNETMASK` makes it a
    /// /32. Chosen over `nsenter ... ip addr add` because it needs no external tool and works
    /// from a thread that alone is in the namespace.
    fn add_lo_address(alias: &str, address: Ipv4Addr) {
        let socket = ioctl_socket();
        let mut req = ifreq_for(alias).expect("alias name");
        req.ifr_ifru.ifru_addr = sockaddr(address);
        // SAFETY: `req` is a valid ifreq holding a name and an AF_INET address; the kernel
        // reads it and writes nothing outside it.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFADDR, &raw mut req) };
        assert_eq!(rc, 0, "SIOCSIFADDR {alias}: {}", io::Error::last_os_error());
        req.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::BROADCAST);
        // SAFETY: as above, with the netmask.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFNETMASK, &raw mut req) };
        assert_eq!(
            rc,
            0,
            "SIOCSIFNETMASK {alias}: {}",
            io::Error::last_os_error()
        );
    }

    /// Adds the route `destination`/`prefix` via device `device` (no gateway) with `SIOCADDRT`.
    fn add_route(destination: Ipv4Addr, prefix: u32, device: &str) {
        let socket = ioctl_socket();
        let mask = Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix).unwrap_or(0));
        let mut name: Vec<libc::c_char> = device.bytes().map(u8::cast_signed).collect();
        name.push(0);
        // SAFETY: `rtentry` is plain old data plus one pointer; all-zero bytes are valid (a
        // null `rt_dev`).
        let mut route: libc::rtentry = unsafe { mem::zeroed() };
        route.rt_dst = sockaddr(destination);
        route.rt_genmask = sockaddr(mask);
        route.rt_flags = libc::RTF_UP;
        route.rt_dev = name.as_mut_ptr();
        // SAFETY: `route` is a valid rtentry whose `rt_dev` points at a NUL-terminated name
        // that outlives the call; the kernel only reads them.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCADDRT, &raw mut route) };
        assert_eq!(
            rc,
            0,
            "SIOCADDRT {destination}/{prefix} dev {device}: {}",
            io::Error::last_os_error()
        );
    }

    /// An IPv4/UDP packet `src` -> `dst` with `payload`, checksums filled in.
    fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
        let builder = PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64)
            .udp(src.port(), dst.port());
        let mut out = Vec::with_capacity(builder.size(payload.len()));
        builder.write(&mut out, payload).expect("build packet");
        out
    }

    /// Opens `name` up, sets rp_filter 0 on it and `all`, and puts the VIP on `lo`.
    fn agent_like_setup(name: &str) -> Tun {
        let tun = Tun::open(name, true).expect("open tun");
        assert_eq!(tun.name(), name);
        rp_filter(name, 0, 0);
        add_lo_address("lo:1", VIP);
        tun
    }

    #[test]
    fn injected_packet_reaches_a_local_socket_on_the_vip() {
        in_private_netns(|| {
            let tun = agent_like_setup("tuntest0");
            let server = UdpSocket::bind((VIP, 5000)).expect("bind VIP:5000");
            server
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let client = SocketAddrV4::new(CLIENT, 4000);
            for seq in 0u32..3 {
                let payload = [b"inner ".as_slice(), &seq.to_be_bytes()].concat();
                let packet = udp_packet(client, SocketAddrV4::new(VIP, 5000), &payload);
                tun.write_packet(&packet).expect("write");
                let mut buf = [0u8; 64];
                let (n, from) = server.recv_from(&mut buf).expect("datagram via the TUN");
                assert_eq!(&buf[..n], &payload[..]);
                assert_eq!(from, client.into(), "source as written, not rewritten");
            }
        });
    }

    #[test]
    fn rp_filter_must_be_zero_for_injection() {
        in_private_netns(|| {
            let tun = agent_like_setup("tuntest0");
            // As on a real backend, the client is reachable through another device (here
            // `lo`), not through the TUN.
            add_route(Ipv4Addr::new(198, 18, 1, 0), 24, "lo");
            let server = UdpSocket::bind((VIP, 5001)).expect("bind");
            server
                .set_read_timeout(Some(Duration::from_millis(300)))
                .expect("timeout");
            let packet = udp_packet(
                SocketAddrV4::new(CLIENT, 4000),
                SocketAddrV4::new(VIP, 5001),
                b"x",
            );
            let mut buf = [0u8; 16];
            // Loose mode (2) on the TUN only: the effective value is max(all, device) = 2,
            // and the address-less TUN makes even loose mode drop.
            rp_filter("tuntest0", 0, 2);
            tun.write_packet(&packet).expect("write is accepted");
            let err = server
                .recv_from(&mut buf)
                .expect_err("dropped by rp_filter");
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
            // The same through `all` = 2.
            rp_filter("tuntest0", 2, 0);
            tun.write_packet(&packet).expect("write is accepted");
            let err = server
                .recv_from(&mut buf)
                .expect_err("dropped by rp_filter");
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
            // Both 0: delivered.
            rp_filter("tuntest0", 0, 0);
            tun.write_packet(&packet).expect("write");
            let (n, _) = server
                .recv_from(&mut buf)
                .expect("delivered with rp_filter 0");
            assert_eq!(&buf[..n], b"x");
        });
    }

    #[test]
    fn routed_packet_comes_out_of_read_packet() {
        in_private_netns(|| {
            let tun = agent_like_setup("tuntest0");
            add_route(Ipv4Addr::new(198, 18, 77, 0), 24, "tuntest0");
            let sender = UdpSocket::bind((VIP, 6000)).expect("bind");
            let target = SocketAddrV4::new(Ipv4Addr::new(198, 18, 77, 5), 7000);
            sender.send_to(b"egress", target).expect("send_to");
            let mut buf = vec![0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(3);
            // The device may also carry the kernel's own IPv6 traffic (router solicitation,
            // MLD): skip anything that is not our datagram.
            let packet = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let Some((header, n)) = tun.read_packet(&mut buf, left).expect("read") else {
                    panic!("the datagram did not come out of the TUN");
                };
                if buf[0] >> 4 == 4 {
                    assert_eq!(header, VnetHeader::NONE, "no offloads: a plain packet");
                    break buf[..n].to_vec();
                }
            };
            let parsed = SlicedPacket::from_ip(&packet).expect("a parsable IPv4 packet");
            let Some(NetSlice::Ipv4(ip)) = &parsed.net else {
                panic!("not IPv4: {parsed:?}");
            };
            let Some(TransportSlice::Udp(udp)) = &parsed.transport else {
                panic!("not UDP: {parsed:?}");
            };
            assert_eq!(ip.header().source_addr(), VIP);
            assert_eq!(ip.header().destination_addr(), *target.ip());
            assert_eq!(udp.source_port(), 6000);
            assert_eq!(udp.destination_port(), 7000);
            assert_eq!(udp.payload(), b"egress");
            // A TUN without offloads gets complete checksums from the stack.
            let expected = udp
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), udp.payload())
                .expect("checksum");
            assert_eq!(udp.checksum(), expected, "UDP checksum complete");

            // A buffer smaller than the packet: the kernel copies what fits, returns that
            // length and discards the rest; only the IP header's length tells.
            sender.send_to(&[7u8; 100], target).expect("send_to");
            let mut small = [0u8; 20];
            let n = loop {
                let (_, n) = tun
                    .read_packet(&mut small, Duration::from_secs(2))
                    .expect("read")
                    .expect("the second datagram");
                if small[0] >> 4 == 4 {
                    break n;
                }
            };
            assert_eq!(n, 20);
            assert_eq!(u16::from_be_bytes([small[2], small[3]]), 20 + 8 + 100);
            let rest = tun
                .read_packet(&mut buf, Duration::from_millis(50))
                .expect("read");
            assert!(
                rest.is_none_or(|(_, n)| buf[..n][0] >> 4 == 6),
                "the rest of the packet is not delivered later: {rest:?}"
            );
        });
    }

    /// Reads from `tun` until an IPv4/TCP packet `from` -> `to` arrives (3 s at most) and
    /// returns (flags SYN, ACK, its sequence number, its acknowledgement number).
    fn read_tcp(tun: &Tun, from: SocketAddrV4, to: SocketAddrV4) -> (bool, bool, u32, u32) {
        let mut buf = vec![0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((_, n)) = tun.read_packet(&mut buf, left).expect("read") else {
                panic!("no TCP packet {from} -> {to} came out of the TUN");
            };
            let Ok(parsed) = SlicedPacket::from_ip(&buf[..n]) else {
                continue;
            };
            let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) =
                (&parsed.net, &parsed.transport)
            else {
                continue;
            };
            if SocketAddrV4::new(ip.header().source_addr(), tcp.source_port()) == from
                && SocketAddrV4::new(ip.header().destination_addr(), tcp.destination_port()) == to
            {
                return (
                    tcp.syn(),
                    tcp.ack(),
                    tcp.sequence_number(),
                    tcp.acknowledgment_number(),
                );
            }
        }
    }

    #[test]
    fn tcp_handshake_through_the_tun_as_sock_diag_sees_it() {
        in_private_netns(|| {
            let tun = agent_like_setup("tuntest0");
            // Here replies to the client are routed back into the TUN, so the test can read
            // them (a real backend sends them straight to the client: DSR).
            add_route(Ipv4Addr::new(198, 18, 1, 0), 24, "tuntest0");
            let listener = TcpListener::bind((VIP, 80)).expect("listen on VIP:80");
            let mut diag = SockDiag::open().expect("sock_diag");
            let client = SocketAddrV4::new(CLIENT, 40000);
            let vip = SocketAddrV4::new(VIP, 80);
            let (local, remote) = (SocketAddr::from(vip), SocketAddr::from(client));
            assert!(!diag.tcp_connection_exists(local, remote).expect("query"));

            let build = |builder: etherparse::PacketBuilderStep<etherparse::TcpHeader>| {
                let mut out = Vec::with_capacity(builder.size(0));
                builder.write(&mut out, &[]).expect("build");
                out
            };
            let isn = 1_000_000u32;
            let syn = PacketBuilder::ipv4(CLIENT.octets(), VIP.octets(), 64)
                .tcp(client.port(), vip.port(), isn, 65535)
                .syn();
            tun.write_packet(&build(syn)).expect("write SYN");
            let (is_syn, is_ack, server_isn, acked) = read_tcp(&tun, vip, client);
            assert!(is_syn && is_ack, "a SYN-ACK");
            assert_eq!(acked, isn + 1);
            // The handshake's last ACK must come here: a request socket counts.
            assert_eq!(
                diag.tcp_state(local, remote).expect("query"),
                Some(state::SYN_RECV)
            );
            assert!(diag.tcp_connection_exists(local, remote).expect("query"));

            let ack = PacketBuilder::ipv4(CLIENT.octets(), VIP.octets(), 64)
                .tcp(client.port(), vip.port(), isn + 1, 65535)
                .ack(server_isn.wrapping_add(1));
            tun.write_packet(&build(ack)).expect("write ACK");
            let (_stream, peer) = listener.accept().expect("accept");
            assert_eq!(peer, remote);
            assert_eq!(
                diag.tcp_state(local, remote).expect("query"),
                Some(state::ESTABLISHED)
            );
        });
    }

    /// An IPv4/TCP segment `from` -> `to` (ACK, window 65535, DF, IP ID `id`) with `payload`,
    /// checksums filled in.
    fn tcp_segment(
        from: SocketAddrV4,
        to: SocketAddrV4,
        seq: u32,
        ack: u32,
        id: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut ip = etherparse::Ipv4Header::new(
            (20 + payload.len()) as u16,
            64,
            etherparse::IpNumber::TCP,
            from.ip().octets(),
            to.ip().octets(),
        )
        .expect("IPv4 header");
        ip.identification = id;
        ip.header_checksum = ip.calc_header_checksum();
        let mut tcp = etherparse::TcpHeader::new(from.port(), to.port(), seq, 65535);
        tcp.ack = true;
        tcp.acknowledgment_number = ack;
        tcp.checksum = tcp.calc_checksum_ipv4(&ip, payload).expect("checksum");
        let mut out = Vec::new();
        ip.write(&mut out).expect("write");
        tcp.write(&mut out).expect("write");
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_coalesced_gso_write_reaches_a_tcp_socket_intact() {
        in_private_netns(|| {
            let tun = agent_like_setup("tuntest0");
            add_route(Ipv4Addr::new(198, 18, 1, 0), 24, "tuntest0");
            let listener = TcpListener::bind((VIP, 80)).expect("listen on VIP:80");
            let client = SocketAddrV4::new(CLIENT, 40001);
            let vip = SocketAddrV4::new(VIP, 80);
            let isn = 7_000_000u32;
            let syn = PacketBuilder::ipv4(CLIENT.octets(), VIP.octets(), 64)
                .tcp(client.port(), vip.port(), isn, 65535)
                .syn();
            let mut packet = Vec::new();
            syn.write(&mut packet, &[]).expect("build");
            tun.write_packet(&packet).expect("write SYN");
            let (_, _, server_isn, _) = read_tcp(&tun, vip, client);
            let ack = server_isn.wrapping_add(1);
            let handshake_ack = tcp_segment(client, vip, isn + 1, ack, 1, &[]);
            tun.write_packet(&handshake_ack).expect("write ACK");
            let (mut stream, _) = listener.accept().expect("accept");
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");

            // Eight segments of 1000 bytes, in order: one write of one super-packet.
            let data: Vec<u8> = (0..8000u32).map(|i| (i % 251) as u8).collect();
            let mut coalescer = crate::coalesce::Coalescer::new(8);
            for (k, chunk) in data.chunks(1000).enumerate() {
                let seq = isn + 1 + 1000 * k as u32;
                let segment = tcp_segment(client, vip, seq, ack, 2 + k as u16, chunk);
                coalescer.push(&segment).expect("push");
            }
            assert_eq!(coalescer.pending(), 1, "merged into one item");
            let counts = coalescer.flush(&mut |frame| tun.write_frame(frame));
            assert_eq!((counts.writes, counts.packets, counts.coalesced), (1, 8, 8));
            assert_eq!(counts.failed_writes, 0);
            let mut got = vec![0u8; data.len()];
            io::Read::read_exact(&mut stream, &mut got).expect("the stream's bytes");
            assert_eq!(got, data, "delivered intact, in order");
        });
    }

    #[test]
    fn with_offloads_the_kernel_hands_over_gso_packets_that_split_into_wire_segments() {
        in_private_netns(|| {
            let tun = agent_like_setup("tuntest0");
            tun.enable_offloads().expect("TUNSETOFFLOAD");
            add_route(Ipv4Addr::new(198, 18, 77, 0), 24, "tuntest0");
            let peer = SocketAddrV4::new(Ipv4Addr::new(198, 18, 77, 5), 7000);
            let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
            let to_send = data.clone();
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            // The connecting side runs in this namespace too (threads inherit it).
            let sender = std::thread::spawn(move || {
                let mut stream =
                    std::net::TcpStream::connect_timeout(&peer.into(), Duration::from_secs(5))
                        .expect("connect through the TUN");
                io::Write::write_all(&mut stream, &to_send).expect("write");
                // Keep the connection open until the test has read everything.
                let _ = done_rx.recv_timeout(Duration::from_secs(10));
            });
            // Play the peer: answer the SYN with a SYN-ACK offering an MSS of 1000.
            let mut buf = vec![0u8; crate::coalesce::MAX_PACKET];
            let mut out = vec![0u8; crate::coalesce::MAX_PACKET];
            let deadline = Instant::now() + Duration::from_secs(5);
            let (local, syn_seq) = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let (header, n) = tun.read_packet(&mut buf, left).expect("read").expect("SYN");
                crate::vnet::complete_checksum(header, &mut buf[..n]).expect("checksum");
                let Ok(parsed) = SlicedPacket::from_ip(&buf[..n]) else {
                    continue;
                };
                if let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) =
                    (&parsed.net, &parsed.transport)
                    && tcp.syn()
                {
                    let local = SocketAddrV4::new(ip.header().source_addr(), tcp.source_port());
                    break (local, tcp.sequence_number());
                }
            };
            let syn_ack = PacketBuilder::ipv4(peer.ip().octets(), local.ip().octets(), 64)
                .tcp(peer.port(), local.port(), 5000, 65535)
                .syn()
                .ack(syn_seq.wrapping_add(1))
                .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1000)])
                .expect("options");
            let mut packet = Vec::new();
            syn_ack.write(&mut packet, &[]).expect("build");
            tun.write_packet(&packet).expect("write SYN-ACK");

            // Without ACKs from the peer, the first flight is the initial window: 10 × 1000.
            let mut got = vec![None::<u8>; data.len()];
            let mut gso_reads = 0;
            let mut segments = 0;
            while got.iter().any(Option::is_none) {
                let left = deadline.saturating_duration_since(Instant::now());
                let Some((header, n)) = tun.read_packet(&mut buf, left).expect("read") else {
                    panic!("not all data came out of the TUN: {gso_reads} GSO reads");
                };
                let mut each = |seg: &mut [u8]| {
                    let Ok(parsed) = SlicedPacket::from_ip(seg) else {
                        return;
                    };
                    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) =
                        (&parsed.net, &parsed.transport)
                    else {
                        return;
                    };
                    let ip_header = ip.header().to_header();
                    assert_eq!(ip_header.calc_header_checksum(), ip_header.header_checksum);
                    assert_eq!(
                        tcp.to_header()
                            .calc_checksum_ipv4(&ip_header, tcp.payload())
                            .expect("checksum"),
                        tcp.checksum(),
                        "a full TCP checksum on every segment"
                    );
                    assert!(tcp.payload().len() <= 1000, "wire-size segments");
                    let offset = tcp.sequence_number().wrapping_sub(syn_seq.wrapping_add(1));
                    for (k, b) in tcp.payload().iter().enumerate() {
                        if let Some(slot) = got.get_mut(offset as usize + k) {
                            *slot = Some(*b);
                        }
                    }
                    segments += 1;
                };
                if header.is_gso() {
                    gso_reads += 1;
                    crate::vnet::split_tcp(header, &buf[..n], &mut out, &mut each).expect("split");
                } else {
                    crate::vnet::complete_checksum(header, &mut buf[..n]).expect("checksum");
                    each(&mut buf[..n]);
                }
            }
            let got: Vec<u8> = got.into_iter().map(Option::unwrap_or_default).collect();
            assert_eq!(got, data, "the bytes the socket sent, in order");
            assert!(gso_reads > 0, "TSO: at least one read was a GSO packet");
            assert!(segments >= 10);
            let _ = done_tx.send(());
            sender.join().expect("sender");
        });
    }

    #[test]
    fn down_device_times_out_refuses_writes_and_resolves_templates() {
        in_private_netns(|| {
            // Down: the kernel routes nothing into it, so the time-out is deterministic.
            let tun = Tun::open("tt%d", false).expect("open");
            assert_eq!(tun.name(), "tt0");
            let mut buf = [0u8; 1500];
            let start = Instant::now();
            assert_eq!(
                tun.read_packet(&mut buf, Duration::from_millis(50))
                    .expect("read"),
                None
            );
            assert!(start.elapsed() >= Duration::from_millis(50));
            assert_eq!(
                tun.read_packet(&mut buf, Duration::ZERO).expect("read"),
                None
            );
            let packet = udp_packet(
                SocketAddrV4::new(CLIENT, 1),
                SocketAddrV4::new(VIP, 2),
                b"down",
            );
            // A device that is down refuses writes with EIO.
            let err = tun.write_packet(&packet).expect_err("device down");
            assert!(
                err.to_string().starts_with("TUN tt0: write: ")
                    && err.to_string().ends_with("(os error 5)"),
                "{err}"
            );
        });
    }

    #[test]
    fn errors_name_the_device_and_the_step() {
        in_private_netns(|| {
            let err = Tun::open("lo", true).expect_err("lo is not a TUN");
            assert!(err.to_string().starts_with("TUN lo: TUNSETIFF: "), "{err}");
            let err = Tun::open("a-name-far-too-long", true).expect_err("long name");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert!(err.to_string().contains("a-name-far-too-long"), "{err}");

            let tun = Tun::open("tuntest1", true).expect("open");
            let err = tun.write_packet(&[0x50; 40]).expect_err("version 5");
            assert!(
                err.to_string().starts_with("TUN tuntest1: write: "),
                "{err}"
            );
            assert_eq!(err.raw_os_error(), None, "wrapped, kind kept");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            let err = tun.write_packet(&[]).expect_err("empty");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        });
    }
}
