//! A bounded packet generator for the forwarding benchmark: sends prebuilt Ethernet frames on an
//! interface as fast as it can with AF_PACKET and `sendmmsg` (64 frames a call,
//! `PACKET_QDISC_BYPASS`), until a packet count or a time limit is reached.
//!
//! **Invariant.** Every run is bounded in packets and in time; the socket is closed on return.

use std::io;
use std::time::{Duration, Instant};

/// Frames per `sendmmsg`.
const BATCH: usize = 64;

/// What a run sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Frames the kernel accepted.
    pub packets: u64,
    /// How long it ran.
    pub elapsed: Duration,
}

/// Sends `frames` round-robin on `interface` (in the calling thread's network namespace) until
/// `max_packets` were sent or `duration` passed.
pub fn blast(
    interface: &str,
    frames: &[Vec<u8>],
    duration: Duration,
    max_packets: u64,
) -> io::Result<Sent> {
    if frames.is_empty() {
        return Ok(Sent::default());
    }
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
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let _close = CloseOnDrop(fd);
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `one` (a c_int of the given size) during the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_ifindex = index as i32;
    address.sll_halen = 6;
    let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(BATCH);
    let mut headers: Vec<libc::mmsghdr> = Vec::with_capacity(BATCH);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut next = 0usize;
    while sent < max_packets && start.elapsed() < duration {
        iovecs.clear();
        headers.clear();
        let want = BATCH.min(usize::try_from(max_packets - sent).unwrap_or(BATCH));
        for _ in 0..want {
            let frame = &frames[next % frames.len()];
            next += 1;
            iovecs.push(libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            });
        }
        for iov in &mut iovecs {
            // SAFETY: msghdr is plain old data; all-zero is a valid value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&raw mut address).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            msg.msg_iov = iov;
            msg.msg_iovlen = 1;
            headers.push(libc::mmsghdr {
                msg_hdr: msg,
                msg_len: 0,
            });
        }
        // SAFETY: `headers` holds `headers.len()` initialised mmsghdr whose iovecs point into
        // `frames` and whose names point at `address`; all outlive the call.
        let n =
            unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), headers.len() as libc::c_uint, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
        sent += n as u64;
    }
    Ok(Sent {
        packets: sent,
        elapsed: start.elapsed(),
    })
}

struct CloseOnDrop(libc::c_int);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        // SAFETY: the descriptor was opened by `blast` and is closed once, here.
        unsafe { libc::close(self.0) };
    }
}
