//! AF_PACKET receive rings (TPACKET_V3, memory-mapped) with `PACKET_FANOUT_HASH`.
//!
//! [`AfPacketReceiver`] opens a packet socket on one interface, maps a TPACKET_V3 RX ring and
//! hands the frames of the ring's blocks to the worker loop without copying them. Several
//! receivers on one interface (one per worker) join one fanout group with `PACKET_FANOUT_HASH`:
//! the kernel hashes each packet's flow (addresses, protocol, ports) and always gives a flow's
//! packets to the same member, so one worker sees a flow's packets in order. `PACKET_FANOUT_LB`
//! (round robin) would reorder a flow across workers and is never used. No
//! `PACKET_FANOUT_FLAG_DEFRAG` either: the mux must see fragments as they arrive. The kernel's
//! flow hash gives a fragment no ports, so all fragments of a datagram go to one member (by the
//! 3-tuple), matching how `lb_core::packet` steers fragments.
//!
//! **How the ring works.** The ring is `block_count` blocks of `block_size` bytes. The kernel
//! fills one block at a time with frames (each a `tpacket3_hdr`, then the frame at `tp_mac`,
//! `tp_snaplen` bytes long, the next at `tp_next_offset`), and hands the block to user space
//! (`block_status |= TP_STATUS_USER`) when it is full or when `block_timeout_ms` has passed
//! since it was opened. User space reads the block and hands it back by storing
//! `TP_STATUS_KERNEL`. Blocks are used strictly in ring order by both sides.
//!
//! **Invariants.**
//! - `current` is the block user space reads next; blocks are handed back in ring order, each
//!   exactly once, and only after every frame in it has been passed to the callback.
//! - `cursor`, when set, is a position inside block `current`, which user space owns: frames
//!   already handed over are never handed over again, and a call that stops at `max_frames`
//!   continues at the same place in the next call.
//! - Memory ordering: the kernel publishes a block with a write barrier before it sets
//!   `TP_STATUS_USER`, so the status is read with `Acquire` ordering before any frame of the
//!   block is read; the block is handed back with a `Release` store, after the last read of its
//!   frames. The status word is accessed through [`AtomicU32::from_ptr`] (it is 4-aligned: blocks
//!   are page-aligned and the word is at offset 8). The kernel's side is not Rust code, so this
//!   is the usual contract for memory shared with the kernel (as in liburing or libxdp), not
//!   something the Rust memory model itself can promise.
//! - Nothing in [`Receiver::receive`] allocates; it makes one `poll` per call at most, and only
//!   when the current block is still the kernel's.
//! - Every offset and length read from the ring is checked against the block's bounds before a
//!   slice is formed, so even a corrupt ring cannot make it read outside the mapping.
//!
//! **Own transmissions.** `PACKET_IGNORE_OUTGOING` is set on the socket, and
//! `PACKET_FANOUT_FLAG_IGNORE_OUTGOING` on the fanout group, because once a socket joins a group
//! the kernel delivers through the group's hook, which honours only the group's flag. So the
//! mux never receives the packets its host sends.
//!
//! **Partial checksums.** Frames the kernel marks `TP_STATUS_CSUMNOTREADY` (locally generated,
//! or from a veth peer with TX checksum offload) carry an L4 checksum that is not filled in yet.
//! They are handed over unchanged, as the trait passes bytes and the mux does not rewrite inner
//! packets; [`AfPacketReceiver::csum_not_ready_frames`] counts them so the operator can see the
//! misconfiguration (the fix is `ethtool -K <peer> tx off` on the sending side).
//! On `lo` every locally sent TCP or UDP frame is marked so (the tests check it).

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lb_core::packet::Link;

use crate::device::Receiver;

/// `ARPHRD_RAWIP`: a device whose frames are bare IP packets (some cellular modems).
const ARPHRD_RAWIP: u16 = 519;

/// The ring's geometry and when a partly filled block is handed to user space.
///
/// The kernel requires `block_size` to be a multiple of the page size, `frame_size` a multiple
/// of 16 and at least the frame header (`TPACKET3_HDRLEN`), and `frame_size <= block_size`. In
/// TPACKET_V3 frames are packed back to back inside a block, so `frame_size` only enters the
/// kernel's consistency checks: a frame is truncated (`tp_snaplen < tp_len`) only when it does
/// not fit in a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Bytes per block; a multiple of the page size.
    pub block_size: u32,
    /// Blocks in the ring.
    pub block_count: u32,
    /// Nominal frame size, for the kernel's checks (see above).
    pub frame_size: u32,
    /// Milliseconds after which the kernel hands over a block that is not full (and not
    /// empty). The kernel's timer has jiffy granularity, so it can be up to one tick longer.
    pub block_timeout_ms: u32,
}

impl Default for RingConfig {
    /// 128 blocks of 128 KiB (16 MiB), frame size 2048, block time-out 1 ms.
    ///
    /// - **Latency vs batching.** A block reaches user space when it is full or after the
    ///   time-out. Under load a 128 KiB block fills well before 1 ms (about 80 full-size frames
    ///   or about 1000 minimum-size ones), so each block is a batch or more and costs at most
    ///   one `poll`. At a low rate the time-out bounds the added latency at about 1 ms (one
    ///   timer tick more at worst).
    /// - **Many blocks, because a sparse stream spends one per time-out.** At a low rate every
    ///   block retires after 1 ms holding a few frames, so the ring rides out a worker being
    ///   descheduled for about `block_count` ms. Measured: with 16 blocks of 1 MiB, a
    ///   1000-packet-a-second stream lost 8 of 5000 frames at the ring while the machine was
    ///   busy compiling (tests/mux_netns.rs, reloads under load); 128 blocks give 128 ms.
    /// - **Burst absorption.** 16 MiB per receiver: at 10 Gbit/s about 13 ms of full-size
    ///   traffic.
    /// - **Block size.** 128 KiB holds a 64 KiB frame (a GRO'd one, should a NIC hand one
    ///   over) with room to spare, so no frame is truncated.
    fn default() -> Self {
        Self {
            block_size: 1 << 17,
            block_count: 128,
            frame_size: 2048,
            block_timeout_ms: 1,
        }
    }
}

/// Where the reader stands inside the current block.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    /// Frames of the block not yet handed over.
    remaining: u32,
    /// Offset, from the block's start, of the next frame's `tpacket3_hdr`.
    offset: usize,
}

/// An AF_PACKET socket with a memory-mapped TPACKET_V3 receive ring, bound to one interface and
/// optionally a member of a `PACKET_FANOUT_HASH` group. See the module docs.
#[derive(Debug)]
pub struct AfPacketReceiver {
    /// The packet socket; closed when dropped, after the ring is unmapped.
    fd: OwnedFd,
    /// Start of the mapped ring, `block_size * block_count` bytes.
    ring: NonNull<u8>,
    /// Length of the mapping.
    ring_len: usize,
    /// Bytes per block.
    block_size: usize,
    /// Blocks in the ring.
    block_count: usize,
    /// The block user space reads next.
    current: usize,
    /// Position inside `current` when it has been partly read (it is then owned by user space).
    cursor: Option<Cursor>,
    /// What the frames start with.
    link: Link,
    /// Drops reported by `PACKET_STATISTICS`, accumulated (reading resets the kernel's count).
    drops: u64,
    /// Frames handed over that were marked `TP_STATUS_CSUMNOTREADY`.
    csum_not_ready: u64,
    /// The interface's name, for error messages.
    interface: Box<str>,
}

// SAFETY: the receiver exclusively owns its socket and its mapping; `ring` is a private pointer
// into that mapping, used only through `&mut self` (or in `Drop`), so moving the receiver to
// another thread moves sole access with it.
unsafe impl Send for AfPacketReceiver {}

/// Wraps `err` with the interface and the step that failed.
fn context(interface: &str, step: &str, err: &io::Error) -> io::Error {
    io::Error::new(
        err.kind(),
        format!("AF_PACKET on {interface}: {step}: {err}"),
    )
}

/// An error of kind `InvalidInput` about `interface`.
fn invalid(interface: &str, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("AF_PACKET on {interface}: {what}"),
    )
}

/// `setsockopt(fd, level, name, value)` for a plain-old-data `value` (the one wrapper the
/// crate's sockets use: AF_PACKET, AF_XDP, rtnetlink).
pub(crate) fn set_option<T>(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    let Ok(len) = libc::socklen_t::try_from(size_of::<T>()) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: `value` points to `len` readable bytes for the duration of the call, and the fd
    // is a valid open socket owned by the caller.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An `ifreq` naming `interface`, or `None` if the name does not fit (or holds a NUL).
fn ifreq_for(interface: &str) -> Option<libc::ifreq> {
    let bytes = interface.as_bytes();
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

/// `ioctl(fd, request, req)`, for the `SIOCGIF*` requests that fill an `ifreq`.
fn ifreq_ioctl(fd: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `req` is a valid, writable `ifreq` with a NUL-terminated name; the requests used
    // here read the name and write only inside the `ifreq`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(req)) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl AfPacketReceiver {
    /// Opens a TPACKET_V3 receive ring on `interface`, and joins fanout group `fanout_group`
    /// (with `PACKET_FANOUT_HASH`) when it is `Some`. All members of a group must be bound to
    /// the same interface with the same flags; groups are per network namespace.
    ///
    /// Steps, in order: socket (protocol 0, so no frame is queued before the ring exists),
    /// `PACKET_VERSION`, `PACKET_RX_RING`, `mmap`, `PACKET_IGNORE_OUTGOING`, interface index
    /// and hardware type, `bind` (protocol `ETH_P_ALL`, this interface only), then
    /// `PACKET_FANOUT` (the kernel accepts it only on a bound socket).
    ///
    /// # Errors
    ///
    /// Any failing step, as an [`io::Error`] whose message names the interface and the step
    /// (e.g. `AF_PACKET on m0: PACKET_RX_RING: Invalid argument`); `InvalidInput` for a bad
    /// name or ring geometry; `Unsupported` for a device type that is neither Ethernet,
    /// loopback nor bare IP.
    pub fn open(interface: &str, fanout_group: Option<u16>, ring: RingConfig) -> io::Result<Self> {
        let Some(mut req) = ifreq_for(interface) else {
            return Err(invalid(interface, "bad interface name"));
        };
        if ring.block_size == 0 || ring.block_count == 0 || ring.frame_size == 0 {
            return Err(invalid(interface, "ring sizes must not be zero"));
        }
        let frames_per_block = ring.block_size / ring.frame_size;
        let (Some(frame_count), Some(ring_len)) = (
            frames_per_block.checked_mul(ring.block_count),
            usize::try_from(ring.block_size)
                .ok()
                .and_then(|b| b.checked_mul(usize::try_from(ring.block_count).ok()?)),
        ) else {
            return Err(invalid(interface, "ring too large"));
        };
        let (Ok(block_size), Ok(block_count)) = (
            usize::try_from(ring.block_size),
            usize::try_from(ring.block_count),
        ) else {
            return Err(invalid(interface, "ring too large"));
        };

        // Protocol 0: the socket receives nothing until `bind` names a protocol, so no frame
        // from another interface can slip in before the ring is set up.
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(context(interface, "socket", &io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let version = libc::tpacket_versions::TPACKET_V3 as libc::c_int;
        set_option(&fd, libc::SOL_PACKET, libc::PACKET_VERSION, &version)
            .map_err(|e| context(interface, "PACKET_VERSION", &e))?;
        let request = libc::tpacket_req3 {
            tp_block_size: ring.block_size,
            tp_block_nr: ring.block_count,
            tp_frame_size: ring.frame_size,
            tp_frame_nr: frame_count,
            tp_retire_blk_tov: ring.block_timeout_ms,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        set_option(&fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &request)
            .map_err(|e| context(interface, "PACKET_RX_RING", &e))?;

        // SAFETY: maps the ring the kernel just allocated for this socket: a fresh shared
        // mapping chosen by the kernel, not overlapping any Rust object; the result is checked.
        let mapped = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(context(interface, "mmap", &io::Error::last_os_error()));
        }
        let Some(ring_ptr) = NonNull::new(mapped.cast::<u8>()) else {
            return Err(invalid(interface, "mmap returned a null pointer"));
        };
        // From here on `Drop` unmaps the ring and closes the socket, on every error path too.
        let mut receiver = Self {
            fd,
            ring: ring_ptr,
            ring_len,
            block_size,
            block_count,
            current: 0,
            cursor: None,
            link: Link::Ethernet,
            drops: 0,
            csum_not_ready: 0,
            interface: interface.into(),
        };

        let one: libc::c_int = 1;
        set_option(
            &receiver.fd,
            libc::SOL_PACKET,
            libc::PACKET_IGNORE_OUTGOING,
            &one,
        )
        .map_err(|e| context(interface, "PACKET_IGNORE_OUTGOING", &e))?;

        ifreq_ioctl(&receiver.fd, libc::SIOCGIFINDEX, &mut req)
            .map_err(|e| context(interface, "SIOCGIFINDEX", &e))?;
        // SAFETY: SIOCGIFINDEX succeeded, so the kernel wrote the `ifru_ifindex` member.
        let ifindex = unsafe { req.ifr_ifru.ifru_ifindex };
        ifreq_ioctl(&receiver.fd, libc::SIOCGIFHWADDR, &mut req)
            .map_err(|e| context(interface, "SIOCGIFHWADDR", &e))?;
        // SAFETY: SIOCGIFHWADDR succeeded, so the kernel wrote the `ifru_hwaddr` member, whose
        // `sa_family` is the device type (ARPHRD_*).
        let hardware_type = unsafe { req.ifr_ifru.ifru_hwaddr.sa_family };
        receiver.link = match hardware_type {
            // Loopback frames carry a 14-byte Ethernet header with zero addresses.
            libc::ARPHRD_ETHER | libc::ARPHRD_LOOPBACK => Link::Ethernet,
            libc::ARPHRD_NONE | ARPHRD_RAWIP => Link::Ip,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "AF_PACKET on {interface}: device type {other} is neither Ethernet, \
                         loopback nor bare IP"
                    ),
                ));
            }
        };

        // SAFETY: `sockaddr_ll` is plain old data; all-zero bytes are a valid value.
        let mut address: libc::sockaddr_ll = unsafe { mem::zeroed() };
        address.sll_family = libc::AF_PACKET as libc::c_ushort;
        address.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        address.sll_ifindex = ifindex;
        let address_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `address` is a valid `sockaddr_ll` of `address_len` bytes; the fd is valid.
        let rc = unsafe {
            libc::bind(
                receiver.fd.as_raw_fd(),
                std::ptr::from_ref(&address).cast(),
                address_len,
            )
        };
        if rc != 0 {
            return Err(context(interface, "bind", &io::Error::last_os_error()));
        }

        if let Some(group) = fanout_group {
            // Flags: the group's own ignore-outgoing (see the module docs). Never DEFRAG.
            let type_flags = libc::PACKET_FANOUT_HASH | libc::PACKET_FANOUT_FLAG_IGNORE_OUTGOING;
            let value = (type_flags << 16) | u32::from(group);
            set_option(&receiver.fd, libc::SOL_PACKET, libc::PACKET_FANOUT, &value)
                .map_err(|e| context(interface, "PACKET_FANOUT", &e))?;
        }
        Ok(receiver)
    }

    /// Frames handed over so far that the kernel marked `TP_STATUS_CSUMNOTREADY` (their L4
    /// checksum is not filled in; see the module docs).
    #[must_use]
    pub fn csum_not_ready_frames(&self) -> u64 {
        self.csum_not_ready
    }

    /// The status word of block `index`.
    fn block_status(&self, index: usize) -> &AtomicU32 {
        // SAFETY: `index < block_count`, so the block descriptor lies inside the mapping, which
        // lives as long as `self`; `block_status` is at offset 8 of a page-aligned block, so it
        // is 4-aligned. The word is only ever accessed atomically from user space (here), and
        // the kernel accesses it with its own barriers (see the module docs).
        unsafe {
            let desc = self
                .ring
                .as_ptr()
                .add(index * self.block_size)
                .cast::<libc::tpacket_block_desc>();
            AtomicU32::from_ptr(std::ptr::addr_of_mut!((*desc).hdr.bh1.block_status))
        }
    }

    /// Whether block `current` belongs to user space.
    fn current_ready(&self) -> bool {
        self.block_status(self.current).load(Ordering::Acquire) & libc::TP_STATUS_USER != 0
    }

    /// Hands block `current` back to the kernel and moves to the next one.
    fn release_current(&mut self) {
        self.block_status(self.current)
            .store(libc::TP_STATUS_KERNEL, Ordering::Release);
        self.cursor = None;
        self.current = (self.current + 1) % self.block_count;
    }

    /// Waits up to `timeout` for the socket to become readable (a block handed over).
    fn wait(&self, timeout: Duration) -> io::Result<()> {
        // Round up, so a sub-millisecond time-out still sleeps instead of spinning.
        let millis = timeout.as_nanos().div_ceil(1_000_000);
        let millis = libc::c_int::try_from(millis).unwrap_or(libc::c_int::MAX);
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid, writable `pollfd`.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, millis) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(context(&self.interface, "poll", &err));
        }
        if pfd.revents & libc::POLLERR != 0 {
            // Read and clear the pending socket error, so it is reported once, not forever.
            let mut error: libc::c_int = 0;
            let mut len = size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: `error` and `len` are valid and writable; `len` holds `error`'s size.
            let rc = unsafe {
                libc::getsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    std::ptr::from_mut(&mut error).cast(),
                    &raw mut len,
                )
            };
            if rc == 0 && error != 0 {
                return Err(context(
                    &self.interface,
                    "socket error",
                    &io::Error::from_raw_os_error(error),
                ));
            }
        }
        if pfd.revents & libc::POLLNVAL != 0 {
            return Err(invalid(&self.interface, "poll: descriptor not open"));
        }
        Ok(())
    }
}

impl Receiver for AfPacketReceiver {
    fn link(&self) -> Link {
        self.link
    }

    fn receive(
        &mut self,
        max_frames: usize,
        timeout: Duration,
        on_frame: &mut dyn FnMut(&[u8]),
    ) -> io::Result<usize> {
        if max_frames == 0 {
            return Ok(0);
        }
        if self.cursor.is_none() && !self.current_ready() {
            self.wait(timeout)?;
        }
        let header_len = size_of::<libc::tpacket3_hdr>();
        let mut handed = 0;
        // Walk the current block, then any further blocks that are already user space's (no
        // `poll` for them), until `max_frames`.
        while handed < max_frames {
            let mut cursor = match self.cursor {
                Some(cursor) => cursor,
                None => {
                    if !self.current_ready() {
                        break;
                    }
                    // SAFETY: the block is user space's (Acquire load above), `current` is in
                    // the ring, and the descriptor's fields are plain `u32`s inside the mapping.
                    let (count, first) = unsafe {
                        let desc = self
                            .ring
                            .as_ptr()
                            .add(self.current * self.block_size)
                            .cast::<libc::tpacket_block_desc>();
                        let bh1 = std::ptr::addr_of!((*desc).hdr.bh1);
                        (
                            std::ptr::addr_of!((*bh1).num_pkts).read_volatile(),
                            std::ptr::addr_of!((*bh1).offset_to_first_pkt).read_volatile(),
                        )
                    };
                    Cursor {
                        remaining: count,
                        offset: first as usize,
                    }
                }
            };
            while handed < max_frames && cursor.remaining > 0 {
                // A frame header that would not fit in the block means a corrupt ring: drop the
                // rest of the block rather than read outside it.
                let Some(header_end) = cursor.offset.checked_add(header_len) else {
                    cursor.remaining = 0;
                    break;
                };
                if header_end > self.block_size {
                    cursor.remaining = 0;
                    break;
                }
                // SAFETY: the header lies inside block `current` (checked just above), which
                // user space owns; `read_unaligned` needs no alignment.
                let header = unsafe {
                    self.ring
                        .as_ptr()
                        .add(self.current * self.block_size + cursor.offset)
                        .cast::<libc::tpacket3_hdr>()
                        .read_unaligned()
                };
                let start = cursor.offset + usize::from(header.tp_mac);
                let end = start.saturating_add(header.tp_snaplen as usize);
                if end <= self.block_size {
                    // SAFETY: `start..end` lies inside block `current` (checked just above),
                    // which user space owns and the kernel does not write until it is handed
                    // back; the slice does not outlive this call of `on_frame`.
                    let frame = unsafe {
                        std::slice::from_raw_parts(
                            self.ring
                                .as_ptr()
                                .add(self.current * self.block_size + start),
                            end - start,
                        )
                    };
                    if header.tp_status & libc::TP_STATUS_CSUMNOTREADY != 0 {
                        self.csum_not_ready += 1;
                    }
                    on_frame(frame);
                    handed += 1;
                }
                cursor.remaining -= 1;
                if cursor.remaining > 0 {
                    if header.tp_next_offset == 0 {
                        cursor.remaining = 0;
                    }
                    cursor.offset += header.tp_next_offset as usize;
                }
            }
            if cursor.remaining == 0 {
                self.release_current();
            } else {
                self.cursor = Some(cursor);
            }
        }
        Ok(handed)
    }

    fn kernel_drops(&mut self) -> u64 {
        // SAFETY: `tpacket_stats_v3` is plain old data; all-zero bytes are a valid value.
        let mut stats: libc::tpacket_stats_v3 = unsafe { mem::zeroed() };
        let mut len = size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
        // SAFETY: `stats` and `len` are valid and writable; `len` holds `stats`' size.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                std::ptr::from_mut(&mut stats).cast(),
                &raw mut len,
            )
        };
        if rc == 0 {
            // Reading resets the kernel's counters: accumulate.
            self.drops += u64::from(stats.tp_drops);
        } else {
            tracing::debug!(
                interface = %self.interface,
                error = %io::Error::last_os_error(),
                "AF_PACKET: PACKET_STATISTICS failed"
            );
        }
        self.drops
    }
}

impl Drop for AfPacketReceiver {
    fn drop(&mut self) {
        // SAFETY: `ring`/`ring_len` describe the mapping made in `open`, which nothing else
        // references once `self` is being dropped (frames never outlive a callback). The socket
        // is closed afterwards, when `fd` drops.
        let rc = unsafe { libc::munmap(self.ring.as_ptr().cast(), self.ring_len) };
        if rc != 0 {
            tracing::warn!(
                interface = %self.interface,
                error = %io::Error::last_os_error(),
                "AF_PACKET: munmap failed"
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod testns {
    //! Runs a test inside a private network namespace with only `lo`, up.

    use std::io;
    use std::mem;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// Runs `test` on a new thread that first moves into a fresh network namespace (only that
    /// thread: `unshare(CLONE_NEWNET)` affects the calling thread) and brings `lo` up. The
    /// namespace disappears when the thread and its sockets are gone. Fails, never skips, when
    /// not root.
    pub(crate) fn in_private_netns<T: Send + 'static>(
        test: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "needs root: this test creates a private network namespace and raw/packet sockets"
        );
        let handle = std::thread::spawn(move || {
            // SAFETY: unshare(CLONE_NEWNET) only changes this thread's network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            );
            pin_to_current_cpu();
            loopback_up();
            test()
        });
        match handle.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Pins this thread to the CPU it runs on. `lo` queues a sent packet on the sending CPU's
    /// backlog, so a sender that migrated between CPUs could see its packets reordered; the
    /// tests check order, and pinning makes that deterministic.
    fn pin_to_current_cpu() {
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        let Ok(cpu) = usize::try_from(cpu) else {
            return;
        };
        if cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        // SAFETY: `cpu_set_t` is a plain bit array; zero is the empty set.
        let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
        // SAFETY: `cpu < CPU_SETSIZE`, so the bit is inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
        let rc =
            unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
        assert_eq!(rc, 0, "sched_setaffinity: {}", io::Error::last_os_error());
    }

    /// Sets IFF_UP on `lo` in the current namespace.
    fn loopback_up() {
        // SAFETY: plain socket(2) call; checked below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `ifreq` is plain old data; zero is valid.
        let mut req: libc::ifreq = unsafe { mem::zeroed() };
        for (dst, &src) in req.ifr_name.iter_mut().zip(b"lo") {
            *dst = src.cast_signed();
        }
        // SAFETY: `req` is a valid ifreq naming `lo`; SIOCGIFFLAGS writes only inside it.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut req) };
        assert_eq!(rc, 0, "SIOCGIFFLAGS lo: {}", io::Error::last_os_error());
        // SAFETY: SIOCGIFFLAGS wrote `ifru_flags`; writing a union field of plain data is safe
        // in itself, reading needs the unsafe block.
        unsafe {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        }
        // SAFETY: as above; SIOCSIFFLAGS reads the ifreq.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &raw mut req) };
        assert_eq!(rc, 0, "SIOCSIFFLAGS lo up: {}", io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, UdpSocket};
    use std::time::{Duration, Instant};

    use lb_core::packet::{Kind, parse};

    use super::testns::in_private_netns;
    use super::*;

    /// A small ring, so a test spans many blocks.
    fn small_ring(block_count: u32) -> RingConfig {
        RingConfig {
            block_size: 16 * 1024,
            block_count,
            frame_size: 2048,
            block_timeout_ms: 1,
        }
    }

    /// One received UDP datagram to `port`: (source port, sequence number in the payload).
    fn udp_seq(frame: &[u8], link: Link, port: u16) -> Option<(u16, u32)> {
        let parsed = parse(frame, link).ok()?;
        let Kind::Transport { flow, .. } = parsed.kind else {
            return None;
        };
        if flow.protocol() != 17 || flow.dst_port() != port {
            return None;
        }
        let payload = parsed.ip.get(28..32)?;
        Some((
            flow.src_port(),
            u32::from_be_bytes(payload.try_into().ok()?),
        ))
    }

    /// A socket bound to 127.0.0.1:`port` so datagrams to it get no ICMP "port unreachable";
    /// never read (its queue may overflow, which is fine).
    fn sink(port: u16) -> UdpSocket {
        UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).expect("bind sink")
    }

    #[test]
    fn default_ring_is_consistent() {
        let ring = RingConfig::default();
        assert_eq!(ring.block_size % 4096, 0);
        assert_eq!(ring.frame_size % 16, 0);
        assert!(ring.frame_size as usize >= libc::TPACKET3_HDRLEN);
        assert!(ring.frame_size <= ring.block_size);
    }

    #[test]
    fn open_errors_name_interface_and_step() {
        in_private_netns(|| {
            let err = AfPacketReceiver::open("nosuch0", None, RingConfig::default()).unwrap_err();
            let text = err.to_string();
            assert!(
                text.starts_with("AF_PACKET on nosuch0: SIOCGIFINDEX"),
                "{text}"
            );
            let bad = RingConfig {
                block_size: 5000, // not a multiple of the page size
                ..small_ring(2)
            };
            let err = AfPacketReceiver::open("lo", None, bad).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("AF_PACKET on lo: PACKET_RX_RING"),
                "{err}"
            );
            let err = AfPacketReceiver::open("", None, small_ring(2)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            let err = AfPacketReceiver::open(
                "lo",
                None,
                RingConfig {
                    frame_size: 0,
                    ..small_ring(2)
                },
            )
            .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        });
    }

    #[test]
    fn loopback_frames_arrive_in_order_in_bounded_batches() {
        in_private_netns(|| {
            const N: u32 = 1000;
            const PORT: u16 = 9000;
            const BATCH: usize = 7;
            let mut rx = AfPacketReceiver::open("lo", None, small_ring(64)).expect("open lo");
            assert_eq!(rx.link(), Link::Ethernet);
            let _sink = sink(PORT);
            let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind sender");
            for seq in 0..N {
                tx.send_to(&seq.to_be_bytes(), (Ipv4Addr::LOCALHOST, PORT))
                    .expect("send");
            }
            let mut seen = Vec::with_capacity(N as usize);
            let mut stopped_mid_block = 0;
            let deadline = Instant::now() + Duration::from_secs(5);
            while seen.len() < N as usize && Instant::now() < deadline {
                let mut calls = 0;
                let n = rx
                    .receive(BATCH, Duration::from_millis(20), &mut |frame| {
                        calls += 1;
                        if let Some((_, seq)) = udp_seq(frame, Link::Ethernet, PORT) {
                            seen.push(seq);
                        }
                    })
                    .expect("receive");
                assert_eq!(n, calls, "return value counts the frames handed over");
                assert!(n <= BATCH, "at most max_frames per call, got {n}");
                if rx.cursor.is_some() {
                    stopped_mid_block += 1;
                }
            }
            let expected: Vec<u32> = (0..N).collect();
            assert_eq!(seen, expected, "all datagrams, in order, each once");
            assert!(stopped_mid_block > 0, "some call stopped inside a block");
            // `lo` passes locally sent UDP on with its checksum still partial: all are marked.
            assert_eq!(rx.csum_not_ready_frames(), u64::from(N));
            assert_eq!(rx.kernel_drops(), 0);
            // Nothing more: a timeout gives 0.
            let n = rx
                .receive(BATCH, Duration::from_millis(5), &mut |_| {})
                .expect("receive");
            assert_eq!(n, 0);
        });
    }

    #[test]
    fn full_ring_counts_kernel_drops() {
        in_private_netns(|| {
            const PORT: u16 = 9001;
            let mut rx = AfPacketReceiver::open("lo", None, small_ring(2)).expect("open lo");
            let _sink = sink(PORT);
            let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind sender");
            // Two 16 KiB blocks hold a few hundred small frames: 2000 must overflow.
            for seq in 0u32..2000 {
                tx.send_to(&seq.to_be_bytes(), (Ipv4Addr::LOCALHOST, PORT))
                    .expect("send");
            }
            let first = rx.kernel_drops();
            assert!(first > 0, "expected drops with a full ring");
            // Reading resets the kernel's counter; ours accumulates.
            assert!(rx.kernel_drops() >= first);
            // The ring still works after overflowing: drain it, then new frames arrive.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if rx
                    .receive(64, Duration::from_millis(20), &mut |_| {})
                    .expect("receive")
                    == 0
                {
                    break;
                }
            }
            tx.send_to(&7777u32.to_be_bytes(), (Ipv4Addr::LOCALHOST, PORT))
                .expect("send");
            let mut got = Vec::new();
            while got.is_empty() && Instant::now() < deadline {
                rx.receive(64, Duration::from_millis(20), &mut |frame| {
                    if let Some((_, seq)) = udp_seq(frame, Link::Ethernet, PORT) {
                        got.push(seq);
                    }
                })
                .expect("receive");
            }
            assert_eq!(got, vec![7777]);
        });
    }

    #[test]
    fn fanout_hash_keeps_each_flow_on_one_receiver_in_order() {
        in_private_netns(|| {
            const PORT: u16 = 9002;
            // Odd, so round robin (PACKET_FANOUT_LB) over the interleaved sends below would
            // alternate each flow between the two members (with an even count it would not).
            const FLOWS: usize = 61;
            const PER_FLOW: u32 = 10;
            let mut a = AfPacketReceiver::open("lo", Some(42), small_ring(64)).expect("open a");
            let mut b = AfPacketReceiver::open("lo", Some(42), small_ring(64)).expect("open b");
            let _sink = sink(PORT);
            let senders: Vec<UdpSocket> = (0..FLOWS)
                .map(|_| UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind sender"))
                .collect();
            for seq in 0..PER_FLOW {
                for tx in &senders {
                    tx.send_to(&seq.to_be_bytes(), (Ipv4Addr::LOCALHOST, PORT))
                        .expect("send");
                }
            }
            // flow (source port) -> (receiver, sequence numbers)
            let mut flows: HashMap<u16, Vec<(usize, u32)>> = HashMap::new();
            let total = FLOWS * PER_FLOW as usize;
            let mut count = 0;
            let deadline = Instant::now() + Duration::from_secs(5);
            // Until all arrived, then once more to catch any extra copy.
            let mut extra_round = true;
            while (count < total || mem::take(&mut extra_round)) && Instant::now() < deadline {
                for (index, rx) in [&mut a, &mut b].into_iter().enumerate() {
                    rx.receive(16, Duration::from_millis(5), &mut |frame| {
                        if let Some((src, seq)) = udp_seq(frame, Link::Ethernet, PORT) {
                            flows.entry(src).or_default().push((index, seq));
                            count += 1;
                        }
                    })
                    .expect("receive");
                }
            }
            assert_eq!(
                count, total,
                "every packet exactly once (no outgoing copies)"
            );
            assert_eq!(flows.len(), FLOWS);
            let mut per_receiver = [0usize; 2];
            for (src, packets) in &flows {
                let owner = packets[0].0;
                assert!(
                    packets.iter().all(|&(r, _)| r == owner),
                    "flow from port {src} split across receivers: {packets:?}"
                );
                let seqs: Vec<u32> = packets.iter().map(|&(_, s)| s).collect();
                assert_eq!(
                    seqs,
                    (0..PER_FLOW).collect::<Vec<_>>(),
                    "flow {src} in order"
                );
                per_receiver[owner] += 1;
            }
            assert!(
                per_receiver[0] > 0 && per_receiver[1] > 0,
                "both members got flows: {per_receiver:?}"
            );
        });
    }
}
