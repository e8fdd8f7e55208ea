//! An in-memory device: frames are injected through a channel and transmitted packets are
//! collected, so the whole worker loop runs under `cargo test` without root or interfaces.
//!
//! It keeps the real device's contract: frames arrive in batches of at most `max_frames`, in the
//! order they were injected, and a transmitted packet is visible only after
//! [`Transmitter::flush`]. It allocates (it is for tests, not for the hot path).

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use crossbeam_channel::{Receiver as ChannelReceiver, RecvTimeoutError, Sender, unbounded};
use lb_core::packet::Link;

use crate::device::{FlushReport, Receiver, Transmitter};

/// Receives the frames sent to its [`Injector`].
#[derive(Debug)]
pub struct MemoryReceiver {
    link: Link,
    frames: ChannelReceiver<Vec<u8>>,
}

/// Feeds frames to a [`MemoryReceiver`].
#[derive(Clone, Debug)]
pub struct Injector {
    frames: Sender<Vec<u8>>,
}

impl Injector {
    /// Hands `frame` to the receiver; false when the receiver is gone.
    pub fn inject(&self, frame: &[u8]) -> bool {
        self.frames.send(frame.to_vec()).is_ok()
    }
}

/// A receiver of `link` frames and the injector that feeds it.
#[must_use]
pub fn receiver(link: Link) -> (MemoryReceiver, Injector) {
    let (tx, rx) = unbounded();
    (MemoryReceiver { link, frames: rx }, Injector { frames: tx })
}

impl Receiver for MemoryReceiver {
    fn link(&self) -> Link {
        self.link
    }

    fn receive(
        &mut self,
        max_frames: usize,
        timeout: Duration,
        on_frame: &mut dyn FnMut(&[u8]),
    ) -> io::Result<usize> {
        let first = match self.frames.recv_timeout(timeout) {
            Ok(frame) => frame,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return Ok(0),
        };
        on_frame(&first);
        let mut handed = 1;
        while handed < max_frames {
            let Ok(frame) = self.frames.try_recv() else {
                break;
            };
            on_frame(&frame);
            handed += 1;
        }
        Ok(handed)
    }
}

/// One packet a [`MemoryTransmitter`] sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The IP packet.
    pub packet: Vec<u8>,
    /// Where it was addressed.
    pub destination: IpAddr,
}

/// Collects transmitted packets; they reach the [`Collector`] on flush.
#[derive(Debug)]
pub struct MemoryTransmitter {
    queued: Vec<Sent>,
    sent: Sender<Sent>,
}

/// Where a [`MemoryTransmitter`]'s flushed packets arrive.
#[derive(Debug)]
pub struct Collector {
    sent: ChannelReceiver<Sent>,
}

impl Collector {
    /// Waits up to `timeout` for the next flushed packet.
    #[must_use]
    pub fn next(&self, timeout: Duration) -> Option<Sent> {
        self.sent.recv_timeout(timeout).ok()
    }

    /// Every packet flushed so far.
    #[must_use]
    pub fn drain(&self) -> Vec<Sent> {
        self.sent.try_iter().collect()
    }
}

/// A transmitter and the collector of what it sends.
#[must_use]
pub fn transmitter() -> (MemoryTransmitter, Collector) {
    let (tx, rx) = unbounded();
    (
        MemoryTransmitter {
            queued: Vec::new(),
            sent: tx,
        },
        Collector { sent: rx },
    )
}

impl Transmitter for MemoryTransmitter {
    fn queue(&mut self, packet: &[u8], destination: IpAddr) -> io::Result<()> {
        self.queued.push(Sent {
            packet: packet.to_vec(),
            destination,
        });
        Ok(())
    }

    fn flush(&mut self) -> io::Result<FlushReport> {
        let mut report = FlushReport::default();
        for sent in self.queued.drain(..) {
            if self.sent.send(sent).is_ok() {
                report.sent += 1;
            } else {
                report.failed += 1;
            }
        }
        Ok(report)
    }

    fn queued(&self) -> usize {
        self.queued.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_order_and_respect_max_frames() {
        let (mut rx, inject) = receiver(Link::Ip);
        for i in 0..5u8 {
            assert!(inject.inject(&[i]));
        }
        let mut seen = Vec::new();
        let n = rx
            .receive(3, Duration::from_millis(10), &mut |f| seen.push(f[0]))
            .unwrap();
        assert_eq!((n, seen.as_slice()), (3, &[0, 1, 2][..]));
        let n = rx
            .receive(3, Duration::from_millis(10), &mut |f| seen.push(f[0]))
            .unwrap();
        assert_eq!((n, seen.as_slice()), (2, &[0, 1, 2, 3, 4][..]));
        let n = rx
            .receive(3, Duration::from_millis(1), &mut |_| ())
            .unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn packets_arrive_only_after_flush() {
        let (mut tx, collected) = transmitter();
        let to: IpAddr = "198.18.21.2".parse().unwrap();
        tx.queue(&[0x45; 20], to).unwrap();
        assert_eq!(tx.queued(), 1);
        assert!(collected.drain().is_empty());
        assert_eq!(tx.flush().unwrap().sent, 1);
        assert_eq!(collected.drain()[0].destination, to);
    }
}
