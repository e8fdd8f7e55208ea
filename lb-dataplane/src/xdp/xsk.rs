//! One AF_XDP socket and its UMEM: the memory area the kernel copies received frames into and
//! sends frames from, and the four single-producer single-consumer rings shared with the kernel
//! (fill and RX for receiving, TX and completion for sending).
//!
//! [`Xsk::open`] registers one UMEM per socket and splits it in two halves that never touch
//! each other's frames or rings: an [`XskRx`] (fill + RX rings, the first [`XskConfig::rx_frames`]
//! frames) and an [`XskTx`] (TX + completion rings, the rest). Each half belongs to one worker
//! thread; they share only the socket descriptor and the mappings, through an `Arc`, and are
//! unmapped when both are dropped.
//!
//! **Ring protocol** (the kernel's `xsk_queue.h`, from the user side). A producer (fill, TX)
//! writes descriptors past its cached producer index and publishes them with one release store
//! of the producer index per batch; a consumer (RX, completion) reads up to the producer index
//! it loaded with acquire and returns the slots with one release store of the consumer index.
//! Free space and available entries are computed from cached indices and refreshed only when
//! the cached view runs out, so a batch costs two atomic loads and two stores, not one per
//! frame.
//!
//! **Invariants.**
//! - A frame address is in exactly one place at a time: the kernel (fill, RX, TX or completion
//!   ring) or this side's free list / the frame being read. RX frames are returned to the fill
//!   ring right after the batch's callbacks; TX frames come back through the completion ring.
//! - Every descriptor the kernel hands over is bounds-checked against the UMEM before it is
//!   read; a bad one is counted and skipped, never dereferenced.
//! - Nothing allocates after [`Xsk::open`]; a batch makes at most one `poll` (RX, idle) and a
//!   bounded number of `sendto` kicks (TX, copy mode sends at most 32 frames per kick).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How a socket was bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindMode {
    /// The driver DMAs straight into the UMEM.
    ZeroCopy,
    /// The kernel copies frames between its buffers and the UMEM.
    Copy,
}

impl BindMode {
    /// The name shown in status and metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ZeroCopy => "zero_copy",
            Self::Copy => "copy",
        }
    }
}

/// Sizes of one socket's UMEM and rings.
#[derive(Clone, Copy, Debug)]
pub struct XskConfig {
    /// Bytes per frame (a power of two, 2048 or 4096).
    pub frame_size: u32,
    /// Frames for receiving (a power of two; also the fill and RX ring sizes). 0: no RX ring.
    pub rx_frames: u32,
    /// Frames for sending (a power of two; also the TX and completion ring sizes).
    pub tx_frames: u32,
}

impl Default for XskConfig {
    fn default() -> Self {
        Self {
            frame_size: 4096,
            rx_frames: 4096,
            tx_frames: 2048,
        }
    }
}

/// The kernel's headroom in front of a received frame in copy mode (`XDP_PACKET_HEADROOM`).
pub const XDP_PACKET_HEADROOM: u32 = 256;

impl XskConfig {
    /// The longest frame this UMEM can receive.
    #[must_use]
    pub fn max_frame(&self) -> u32 {
        self.frame_size - XDP_PACKET_HEADROOM
    }
}

/// A memory mapping, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn anonymous(len: usize) -> io::Result<Self> {
        // SAFETY: a new private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        Self::from_mmap(p, len)
    }

    fn ring(fd: &OwnedFd, len: usize, offset: u64) -> io::Result<Self> {
        // SAFETY: maps the ring the kernel created for this socket at `offset`; shared so both
        // sides see each other's index updates.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        Self::from_mmap(p, len)
    }

    fn from_mmap(p: *mut libc::c_void, len: usize) -> io::Result<Self> {
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(p.cast::<u8>())
            .map(|base| Self { base, len })
            .ok_or_else(|| io::Error::other("mmap returned null"))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly one mapping made by `mmap` and not unmapped before;
        // nothing borrows it any more (its owner is being dropped).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// A ring's indices and descriptors inside its mapping.
#[derive(Debug)]
struct Ring<T> {
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    descs: NonNull<T>,
    mask: u32,
    /// This side's copy of the index it owns, and its last view of the other side's index.
    cached_prod: u32,
    cached_cons: u32,
}

impl<T: Copy> Ring<T> {
    /// The ring inside `map`, laid out as `offsets` says, with `size` entries.
    fn new(map: &Mapping, offsets: &libc::xdp_ring_offset, size: u32) -> Self {
        let at = |off: u64| {
            // SAFETY: the kernel's offsets lie inside the mapping it sized for this ring.
            NonNull::new(unsafe { map.base.as_ptr().add(off as usize) }).expect("inside a mapping")
        };
        Self {
            producer: at(offsets.producer).cast(),
            consumer: at(offsets.consumer).cast(),
            flags: at(offsets.flags).cast(),
            descs: at(offsets.desc).cast(),
            mask: size - 1,
            cached_prod: 0,
            cached_cons: 0,
        }
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into a live shared mapping, aligned by the kernel; accessed atomically
        // by both sides.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { self.consumer.as_ref() }
    }

    fn needs_wakeup(&self) -> bool {
        // SAFETY: as for `producer`.
        let flags = unsafe { self.flags.as_ref() };
        flags.load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    fn size(&self) -> u32 {
        self.mask + 1
    }

    // --- producer side (fill, TX) ---

    /// Free slots, refreshing the consumer index when fewer than `want` seem free.
    fn free(&mut self, want: u32) -> u32 {
        let free = self.size() - self.cached_prod.wrapping_sub(self.cached_cons);
        if free >= want {
            return free;
        }
        self.cached_cons = self.consumer().load(Ordering::Acquire);
        self.size() - self.cached_prod.wrapping_sub(self.cached_cons)
    }

    /// Writes `value` into the next slot (the caller checked [`Ring::free`]).
    fn push(&mut self, value: T) {
        let slot = (self.cached_prod & self.mask) as usize;
        // SAFETY: `slot` <= mask, inside the descriptor array; the slot is free (the caller
        // checked free space), so the kernel does not read it until `submit`.
        unsafe { self.descs.as_ptr().add(slot).write_volatile(value) };
        self.cached_prod = self.cached_prod.wrapping_add(1);
    }

    /// Publishes every pushed slot.
    fn submit(&self) {
        self.producer().store(self.cached_prod, Ordering::Release);
    }

    /// Entries published and not yet consumed by the kernel.
    fn outstanding(&mut self) -> u32 {
        self.cached_cons = self.consumer().load(Ordering::Acquire);
        self.cached_prod.wrapping_sub(self.cached_cons)
    }

    // --- consumer side (RX, completion) ---

    /// Entries available, refreshing the producer index when none seem to be.
    fn available(&mut self) -> u32 {
        let n = self.cached_prod.wrapping_sub(self.cached_cons);
        if n > 0 {
            return n;
        }
        self.cached_prod = self.producer().load(Ordering::Acquire);
        self.cached_prod.wrapping_sub(self.cached_cons)
    }

    /// Reads the next available entry (the caller checked [`Ring::available`]).
    fn pop(&mut self) -> T {
        let slot = (self.cached_cons & self.mask) as usize;
        // SAFETY: inside the descriptor array; the kernel published this entry (acquire load
        // of the producer index) and does not reuse it until `release`.
        let value = unsafe { self.descs.as_ptr().add(slot).read_volatile() };
        self.cached_cons = self.cached_cons.wrapping_add(1);
        value
    }

    /// Returns every popped slot to the kernel.
    fn release(&self) {
        self.consumer().store(self.cached_cons, Ordering::Release);
    }
}

/// The socket, its UMEM and ring mappings, shared by its two halves.
#[derive(Debug)]
struct Shared {
    // Field order is drop order: the rings are unmapped before the socket closes, the UMEM
    // after it (the kernel unpins the UMEM when the socket is released).
    _rings: Vec<Mapping>,
    fd: OwnedFd,
    umem: Mapping,
}

// SAFETY: the mappings are plain memory; the halves that use them partition the frames and
// rings, each used by one thread at a time (see the module docs).
unsafe impl Send for Shared {}
// SAFETY: as above; `Shared` itself exposes no interior mutation.
unsafe impl Sync for Shared {}

fn setsockopt<T>(fd: &OwnedFd, name: libc::c_int, value: &T) -> io::Result<()> {
    crate::afpacket::set_option(fd, libc::SOL_XDP, name, value)
}

fn getsockopt<T: Default>(fd: &OwnedFd, name: libc::c_int) -> io::Result<T> {
    let mut value = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a live, writable `T` and `len` its size; the kernel writes at most
    // `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            name,
            std::ptr::from_mut(&mut value).cast(),
            &raw mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

fn zeroed_offsets() -> libc::xdp_mmap_offsets {
    // SAFETY: `xdp_mmap_offsets` is plain integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// How long [`Xsk::open`] waits for a busy queue to be released.
pub const BUSY_WAIT: Duration = Duration::from_secs(2);

/// An AF_XDP socket bound to one queue of one interface.
pub struct Xsk;

impl Xsk {
    /// Opens a socket on queue `queue` of `ifindex`, tries zero-copy first and falls back to
    /// copy mode, and returns its two halves (no receive half when `config.rx_frames` is 0) and
    /// the bind mode in force (with the reason zero-copy was refused).
    ///
    /// A queue whose previous socket was just closed stays busy until the kernel's deferred
    /// release has run (a restarted process meets this), so a busy queue is tried again for up
    /// to [`BUSY_WAIT`] before the error is returned.
    pub fn open(
        ifindex: u32,
        queue: u32,
        config: XskConfig,
    ) -> io::Result<(Option<XskRx>, XskTx, BindMode, Option<String>)> {
        let deadline = Instant::now() + BUSY_WAIT;
        loop {
            match Self::open_once(ifindex, queue, config) {
                Err(e) if e.kind() == io::ErrorKind::ResourceBusy && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{e} (another AF_XDP socket holds this queue)"),
                    ));
                }
                other => return other,
            }
        }
    }

    fn open_once(
        ifindex: u32,
        queue: u32,
        config: XskConfig,
    ) -> io::Result<(Option<XskRx>, XskTx, BindMode, Option<String>)> {
        match Self::open_mode(ifindex, queue, config, BindMode::ZeroCopy) {
            Ok((rx, tx)) => Ok((rx, tx, BindMode::ZeroCopy, None)),
            Err(zc) => {
                let (rx, tx) = Self::open_mode(ifindex, queue, config, BindMode::Copy)?;
                Ok((
                    rx,
                    tx,
                    BindMode::Copy,
                    Some(format!("zero-copy bind refused: {zc}")),
                ))
            }
        }
    }

    fn open_mode(
        ifindex: u32,
        queue: u32,
        config: XskConfig,
        mode: BindMode,
    ) -> io::Result<(Option<XskRx>, XskTx)> {
        let XskConfig {
            frame_size,
            rx_frames,
            tx_frames,
        } = config;
        // The fill ring must exist even for a send-only socket; it then has one slot.
        let fill_size = rx_frames.max(1);
        for n in [fill_size, tx_frames] {
            if !n.is_power_of_two() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "ring sizes must be powers of two",
                ));
            }
        }
        let step = |what: &'static str| {
            move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        // SAFETY: plain socket creation; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(step("socket(AF_XDP)")(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let frames = rx_frames + tx_frames;
        let umem =
            Mapping::anonymous(frames as usize * frame_size as usize).map_err(step("UMEM mmap"))?;
        let reg = libc::xdp_umem_reg {
            addr: umem.base.as_ptr() as u64,
            len: umem.len as u64,
            chunk_size: frame_size,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(&fd, libc::XDP_UMEM_REG, &reg).map_err(step("XDP_UMEM_REG"))?;
        setsockopt(&fd, libc::XDP_UMEM_FILL_RING, &fill_size)
            .map_err(step("XDP_UMEM_FILL_RING"))?;
        setsockopt(&fd, libc::XDP_UMEM_COMPLETION_RING, &tx_frames)
            .map_err(step("XDP_UMEM_COMPLETION_RING"))?;
        if rx_frames > 0 {
            setsockopt(&fd, libc::XDP_RX_RING, &rx_frames).map_err(step("XDP_RX_RING"))?;
        }
        setsockopt(&fd, libc::XDP_TX_RING, &tx_frames).map_err(step("XDP_TX_RING"))?;
        let mut offsets = zeroed_offsets();
        let mut len = size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
        // SAFETY: `offsets` is writable and `len` its size.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                std::ptr::from_mut(&mut offsets).cast(),
                &raw mut len,
            )
        };
        if r < 0 {
            return Err(step("XDP_MMAP_OFFSETS")(io::Error::last_os_error()));
        }
        let desc = size_of::<libc::xdp_desc>() as u64;
        let fill_map = Mapping::ring(
            &fd,
            (offsets.fr.desc + u64::from(fill_size) * 8) as usize,
            libc::XDP_UMEM_PGOFF_FILL_RING,
        )
        .map_err(step("fill ring mmap"))?;
        let comp_map = Mapping::ring(
            &fd,
            (offsets.cr.desc + u64::from(tx_frames) * 8) as usize,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING,
        )
        .map_err(step("completion ring mmap"))?;
        let tx_map = Mapping::ring(
            &fd,
            (offsets.tx.desc + u64::from(tx_frames) * desc) as usize,
            libc::XDP_PGOFF_TX_RING as u64,
        )
        .map_err(step("TX ring mmap"))?;
        let rx_map = if rx_frames > 0 {
            Some(
                Mapping::ring(
                    &fd,
                    (offsets.rx.desc + u64::from(rx_frames) * desc) as usize,
                    libc::XDP_PGOFF_RX_RING as u64,
                )
                .map_err(step("RX ring mmap"))?,
            )
        } else {
            None
        };
        let mut fill = Ring::<u64>::new(&fill_map, &offsets.fr, fill_size);
        let comp = Ring::<u64>::new(&comp_map, &offsets.cr, tx_frames);
        let tx = Ring::<libc::xdp_desc>::new(&tx_map, &offsets.tx, tx_frames);
        let rx = rx_map
            .as_ref()
            .map(|m| Ring::<libc::xdp_desc>::new(m, &offsets.rx, rx_frames));
        // Every receive frame starts in the fill ring.
        if rx_frames > 0 {
            for i in 0..rx_frames {
                fill.push(u64::from(i) * u64::from(frame_size));
            }
            fill.submit();
        }
        let flags = libc::XDP_USE_NEED_WAKEUP
            | match mode {
                BindMode::ZeroCopy => libc::XDP_ZEROCOPY,
                BindMode::Copy => libc::XDP_COPY,
            };
        let address = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: flags,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        // SAFETY: `address` is a valid `sockaddr_xdp` of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&address).cast(),
                size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(step("bind")(io::Error::last_os_error()));
        }
        let mut rings = vec![fill_map, comp_map, tx_map];
        rings.extend(rx_map);
        let shared = Arc::new(Shared {
            _rings: rings,
            fd,
            umem,
        });
        let rx_half = rx.map(|rx| XskRx {
            shared: Arc::clone(&shared),
            fill,
            rx,
            frame_size,
            done: Vec::with_capacity(rx_frames as usize),
            invalid: 0,
        });
        let first_tx = u64::from(rx_frames) * u64::from(frame_size);
        let free = (0..u64::from(tx_frames))
            .map(|i| first_tx + i * u64::from(frame_size))
            .collect();
        let tx_half = XskTx {
            shared,
            tx,
            comp,
            frame_size,
            free,
            pending: 0,
            stalled: 0,
        };
        Ok((rx_half, tx_half))
    }
}

/// The receiving half of a socket: fill and RX rings.
#[derive(Debug)]
pub struct XskRx {
    shared: Arc<Shared>,
    fill: Ring<u64>,
    rx: Ring<libc::xdp_desc>,
    frame_size: u32,
    /// Frame addresses read in this batch, returned to the fill ring at its end.
    done: Vec<u64>,
    invalid: u64,
}

// SAFETY: the half owns its rings and frames exclusively (see the module docs); the raw
// pointers are into mappings kept alive by `shared`.
unsafe impl Send for XskRx {}

impl XskRx {
    /// The socket's descriptor (for the XSKMAP).
    #[must_use]
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.shared.fd.as_raw_fd()
    }

    /// Waits up to `timeout` for frames, then calls `on_frame` for each of at most
    /// `max_frames` received frames, in order; returns how many.
    pub fn receive(
        &mut self,
        max_frames: usize,
        timeout: Duration,
        on_frame: &mut dyn FnMut(&[u8]),
    ) -> io::Result<usize> {
        if self.rx.available() == 0 {
            if self.fill.needs_wakeup() || !timeout.is_zero() {
                poll_in(&self.shared.fd, timeout)?;
            }
            if self.rx.available() == 0 {
                return Ok(0);
            }
        }
        let n = (self.rx.available() as usize).min(max_frames);
        let umem = &self.shared.umem;
        let chunk_mask = !(u64::from(self.frame_size) - 1);
        for _ in 0..n {
            let desc = self.rx.pop();
            let (start, len) = (desc.addr as usize, desc.len as usize);
            if start.checked_add(len).is_none_or(|end| end > umem.len) {
                self.invalid += 1;
            } else {
                // SAFETY: bounds checked against the UMEM just above; the kernel wrote this
                // frame before publishing its descriptor and does not touch it until the frame
                // is back in the fill ring.
                let frame =
                    unsafe { std::slice::from_raw_parts(umem.base.as_ptr().add(start), len) };
                on_frame(frame);
            }
            self.done.push(desc.addr & chunk_mask);
        }
        self.rx.release();
        // The frames in circulation are exactly the fill ring's size, so there is room; were
        // there not, the rest would wait in `done` for the next batch, never be lost.
        let room = (self.fill.free(self.done.len() as u32) as usize).min(self.done.len());
        for &addr in &self.done[..room] {
            self.fill.push(addr);
        }
        self.done.drain(..room);
        self.fill.submit();
        Ok(n)
    }

    /// Frames lost before this side read them: the kernel's `rx_dropped` (no free frame in the
    /// fill ring, or too long for a frame) and `rx_ring_full` (the RX ring was full), plus
    /// descriptors this side refused. `rx_fill_ring_empty_descs` is not added: the kernel
    /// counts a frame dropped for an empty fill ring in it and in `rx_dropped` both.
    pub fn dropped(&self) -> io::Result<u64> {
        let s: Stats = getsockopt(&self.shared.fd, libc::XDP_STATISTICS)?;
        Ok(s.0.rx_dropped + s.0.rx_ring_full + self.invalid)
    }
}

#[repr(transparent)]
struct Stats(libc::xdp_statistics);
impl Default for Stats {
    fn default() -> Self {
        // SAFETY: plain integers; all-zero is valid.
        Self(unsafe { std::mem::zeroed() })
    }
}

fn poll_in(fd: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&raw mut p, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// The sending half of a socket: TX and completion rings, and the free send frames.
#[derive(Debug)]
pub struct XskTx {
    shared: Arc<Shared>,
    tx: Ring<libc::xdp_desc>,
    comp: Ring<u64>,
    frame_size: u32,
    free: Vec<u64>,
    /// Descriptors pushed and not yet published.
    pending: u32,
    /// Descriptors published that the kernel had not consumed when the last flush ended.
    stalled: u32,
}

// SAFETY: as for `XskRx`.
unsafe impl Send for XskTx {}

/// Most `sendto` kicks of one flush (copy mode sends at most 32 frames per kick); a flush also
/// stops after four kicks that moved nothing.
const MAX_KICKS: u32 = 256;

impl XskTx {
    /// The longest frame one send can carry.
    #[must_use]
    pub fn max_frame(&self) -> usize {
        self.frame_size as usize
    }

    /// Frames pushed and not yet taken by the kernel (as of the last flush).
    #[must_use]
    pub fn unsent(&self) -> u32 {
        self.pending + self.stalled
    }

    /// Takes back the frames the kernel finished sending.
    fn reap(&mut self) {
        let n = self.comp.available();
        for _ in 0..n {
            let addr = self.comp.pop();
            if self.free.len() < self.free.capacity() {
                self.free.push(addr);
            }
        }
        if n > 0 {
            self.comp.release();
        }
    }

    /// Writes one frame built by `fill` (given a buffer of [`XskTx::max_frame`] bytes; it
    /// returns the frame's length) into a free send frame and queues it. Returns false, queuing
    /// nothing, when no frame or ring slot is free (flush, then try again).
    pub fn push_with(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) -> bool {
        if self.free.is_empty() {
            self.reap();
        }
        if self.tx.free(1) == 0 {
            return false;
        }
        let Some(addr) = self.free.pop() else {
            return false;
        };
        // SAFETY: `addr` is a send frame owned by this side (from the free list), inside the
        // UMEM (addresses are built from the frame count at open), and the kernel does not
        // read it until its descriptor is published.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(
                self.shared.umem.base.as_ptr().add(addr as usize),
                self.frame_size as usize,
            )
        };
        let len = fill(buf).min(self.frame_size as usize);
        self.tx.push(libc::xdp_desc {
            addr,
            len: len as u32,
            options: 0,
        });
        self.pending += 1;
        true
    }

    /// Publishes the queued frames and kicks the kernel until it took them all, or stops
    /// making progress. Returns how many frames the kernel consumed from the ring.
    pub fn flush(&mut self) -> io::Result<u64> {
        if self.pending > 0 {
            self.tx.submit();
            self.pending = 0;
        }
        let before = self.tx.outstanding();
        let mut outstanding = before;
        let (mut kicks, mut stalls) = (0, 0);
        while outstanding > 0 && kicks < MAX_KICKS && stalls < 4 {
            kicks += 1;
            if self.tx.needs_wakeup() {
                // SAFETY: a zero-length send on our own socket: the kernel only looks at the
                // TX ring.
                let r = unsafe {
                    libc::sendto(
                        self.shared.fd.as_raw_fd(),
                        std::ptr::null(),
                        0,
                        libc::MSG_DONTWAIT,
                        std::ptr::null(),
                        0,
                    )
                };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if !matches!(
                        e.raw_os_error(),
                        Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS | libc::EINTR)
                    ) {
                        self.reap();
                        return Err(e);
                    }
                }
            }
            self.reap();
            let now = self.tx.outstanding();
            stalls = if now == outstanding { stalls + 1 } else { 0 };
            outstanding = now;
        }
        self.reap();
        self.stalled = outstanding;
        Ok(u64::from(before - outstanding))
    }
}
