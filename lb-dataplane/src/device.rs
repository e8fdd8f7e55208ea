//! The packet-device traits the mux worker loop runs on: a [`Receiver`] hands frames over in
//! batches, a [`Transmitter`] queues IP packets and sends them in batches.
//!
//! Implementations: [`crate::afpacket`] (AF_PACKET TPACKET_V3 rings, `PACKET_FANOUT_HASH`) and
//! [`crate::rawip`] (raw IP sockets, `sendmmsg`) on a real interface; [`crate::xdp`] (AF_XDP
//! sockets for both); [`crate::memory`] for tests without root.
//!
//! **Invariant.** Neither trait allocates or makes a syscall per packet: a syscall per batch at
//! most (a `poll` when the ring is empty, one `sendmmsg` per address family per flush).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use lb_core::packet::Link;

/// The receiving half of a device: frames arrive in batches and are borrowed, not copied.
pub trait Receiver: Send {
    /// What received frames start with.
    fn link(&self) -> Link;

    /// Waits up to `timeout` for frames, then calls `on_frame` for each frame of one batch, at
    /// most `max_frames`, in arrival order. Returns how many frames were handed over (0 after a
    /// timeout). A frame is valid only during its call.
    fn receive(
        &mut self,
        max_frames: usize,
        timeout: Duration,
        on_frame: &mut dyn FnMut(&[u8]),
    ) -> io::Result<usize>;

    /// Frames the kernel dropped because the receive buffer was full, since the device was
    /// opened. May make a syscall: call it at a batch boundary, not per packet.
    fn kernel_drops(&mut self) -> u64 {
        0
    }
}

/// Counts of one [`Transmitter::flush`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Packets the kernel accepted.
    pub sent: u64,
    /// Packets the kernel refused (no route, too big, ...); each is skipped, never retried.
    pub failed: u64,
}

/// The sending half of a device: whole IP packets (outer header complete, checksums set), routed
/// by the kernel towards their destination.
pub trait Transmitter: Send {
    /// Queues `packet`, which starts at its IPv4 or IPv6 header and is addressed to
    /// `destination`. Copies it, so the caller's buffer can be reused at once. When the queue is
    /// full it is flushed first.
    fn queue(&mut self, packet: &[u8], destination: IpAddr) -> io::Result<()>;

    /// Sends everything queued.
    fn flush(&mut self) -> io::Result<FlushReport>;

    /// Packets queued and not yet flushed.
    fn queued(&self) -> usize;

    /// Packets this device could not send itself and handed to the kernel's own path instead
    /// (AF_XDP: next hop not resolved yet), since it was opened.
    fn slow_path(&self) -> u64 {
        0
    }
}

/// The destination address in an IP packet's header, if it has a whole one.
#[must_use]
pub fn ip_destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 => {
            let b: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_of_v4_and_v6_and_garbage() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&[198, 18, 21, 2]);
        assert_eq!(ip_destination(&v4), Some("198.18.21.2".parse().unwrap()));
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[39] = 1;
        assert_eq!(ip_destination(&v6), Some("::1".parse().unwrap()));
        assert_eq!(ip_destination(&v4[..19]), None);
        assert_eq!(ip_destination(&[0x50; 40]), None);
        assert_eq!(ip_destination(&[]), None);
    }
}
