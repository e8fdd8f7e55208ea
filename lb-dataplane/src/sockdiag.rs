//! Asks the kernel whether this host has a TCP connection for one exact 4-tuple, over
//! `NETLINK_SOCK_DIAG` (the interface `ss` uses).
//!
//! **Why.** With Beamer-style daisy chaining, a backend's agent that receives a non-SYN
//! segment must know whether the connection lives here; if not, it sends the segment on to the
//! previous backend. [`SockDiag::tcp_connection_exists`] answers that for one
//! (local, remote) pair.
//!
//! **How.** One `SOCK_DIAG_BY_FAMILY` request with an `inet_diag_req_v2` holding the full
//! `inet_diag_sockid` (local address and port as `src`, remote as `dst`, interface 0 or the
//! IPv6 scope, cookie `INET_DIAG_NOCOOKIE`) and `NLM_F_REQUEST` without `NLM_F_DUMP`: the
//! kernel's exact lookup (`inet_diag_find_one_icsk`), not a dump of all sockets. It answers with
//! one `inet_diag_msg`, or with an `NLMSG_ERROR` of `ENOENT` when no socket matches, which is
//! `Ok(false)`. Ports are big-endian in the request, addresses are in network byte order
//! (IPv4 in the first 4 bytes of the 16-byte field), the interface and the netlink header are
//! in host order.
//!
//! **What counts as "exists".** The exact lookup is the kernel's own receive-path demux
//! (`__inet_lookup`): established-hash sockets first, then a listener on the local address and
//! port. So it answers for *any* remote when something listens on the local port; such an
//! answer (state `LISTEN`) is `false`: a listener means "no connection here", and a non-SYN
//! segment for it would be answered with a reset. Every other state is `true`, including
//! - `SYN_RECV` (a request socket: the handshake's last ACK must come here),
//! - `FIN_WAIT1/2`, `CLOSE_WAIT`, `CLOSING`, `LAST_ACK`, which still exchange segments,
//! - `TIME_WAIT`: the socket still re-acknowledges a retransmitted FIN and decides about a SYN
//!   reusing the 4-tuple, so its segments belong here, not on the previous backend (which has
//!   nothing and would reset).
//!
//! In short: `true` exactly when the kernel would hand a segment of this 4-tuple to a
//! connection on this host rather than to a listener or to nobody. IPv4 lookups also find
//! IPv6 sockets of a dual-stack listener that carry IPv4-mapped addresses (the kernel's IPv4
//! demux does too; a test checks it). Not tested, from the kernel's matching rules: a socket
//! bound to a device (`SO_BINDTODEVICE`) is found only with that device's index, which this API
//! passes only as the IPv6 scope id (0 for IPv4).
//!
//! **Cost.** One netlink round trip (a `send` and a `recv`, with the kernel's hash lookup in
//! between) per query: 3 to 6 µs measured here (release build, loopback, few sockets). Fine for
//! the first segment of a flow, too much for every packet. Callers should cache positive
//! answers per flow (and forget them with the flow); negative answers may change as soon as a
//! handshake completes, so cache those only briefly, if at all. Nothing is allocated per
//! query: the request is built on the stack and the reply lands in a buffer allocated at
//! [`SockDiag::open`].
//!
//! **Probe.** A kernel without `inet_diag` / `tcp_diag` also answers `ENOENT`, which would read
//! as "no connection" forever. [`SockDiag::open`] therefore sends one empty dump per family
//! (`idiag_states` 0) and fails if IPv4 has no handler; IPv6 queries fail with `Unsupported`
//! when only IPv6 has none. The socket works in the network namespace of the thread that
//! opened it. Exact lookups should need no privilege (as for `ss`); the tests run as root.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `SOCK_DIAG_BY_FAMILY` (`linux/sock_diag.h`).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLMSG_ERROR`.
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
const NLM_F_DUMP: u16 = 0x300;
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct inet_diag_req_v2)`: 8 bytes, then the 48-byte `inet_diag_sockid`.
const REQ_LEN: usize = 56;
/// `sizeof(struct inet_diag_msg)`.
const DIAG_MSG_LEN: usize = 72;
/// The whole request.
const REQUEST_LEN: usize = NLMSG_HDRLEN + REQ_LEN;
/// `INET_DIAG_NOCOOKIE`: match any socket, whatever its cookie.
const NOCOOKIE: u32 = !0;
/// The reply buffer. An exact reply is `inet_diag_msg` plus a few attributes (a few hundred
/// bytes); the probe's dump is empty.
const BUFFER_LEN: usize = 8192;
/// How long a `recv` may wait. The kernel answers during the `send` itself, so this only bounds
/// a reply that never comes.
const RECV_TIMEOUT_SECS: libc::time_t = 2;

/// TCP states as `inet_diag_msg.idiag_state` reports them (`include/net/tcp_states.h`).
pub(crate) mod state {
    /// `TCP_ESTABLISHED`.
    #[cfg(test)]
    pub(crate) const ESTABLISHED: u8 = 1;
    /// `TCP_SYN_RECV` (a request socket).
    #[cfg(test)]
    pub(crate) const SYN_RECV: u8 = 3;
    /// `TCP_TIME_WAIT`.
    #[cfg(test)]
    pub(crate) const TIME_WAIT: u8 = 6;
    /// `TCP_CLOSE_WAIT`.
    #[cfg(test)]
    pub(crate) const CLOSE_WAIT: u8 = 8;
    /// `TCP_LISTEN`.
    pub(crate) const LISTEN: u8 = 10;
}

/// `idiag_states` of the exact request: every state but `LISTEN`. The kernel ignores the mask
/// for exact lookups (hence the state check on the reply); it is set for readers of traces.
const STATES_BUT_LISTEN: u32 = 0xfff & !(1 << state::LISTEN);

/// One reply message of ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    /// `NLMSG_ERROR` with this (positive) errno; 0 is an acknowledgement.
    Error(i32),
    /// An `inet_diag_msg`: the socket's state and its (local, remote) ports.
    Socket { state: u8, ports: (u16, u16) },
    /// `NLMSG_DONE`: the end of a dump.
    Done,
}

/// A `NETLINK_SOCK_DIAG` socket, reused across queries. See the module docs.
#[derive(Debug)]
pub struct SockDiag {
    /// The netlink socket (blocking, with a receive time-out).
    fd: OwnedFd,
    /// Sequence number of the last request; replies with another one are stale and skipped.
    seq: u32,
    /// Reply buffer, `BUFFER_LEN` bytes.
    buf: Box<[u8]>,
    /// Whether the kernel has an IPv6 `inet_diag` handler.
    ipv6: bool,
}

/// Wraps `err` with the step that failed.
fn context(step: &str, err: &io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("sock_diag: {step}: {err}"))
}

/// Reads a native-endian `u16` at `at`, 0 when out of bounds (callers check lengths first).
fn u16_at(buf: &[u8], at: usize) -> u16 {
    buf.get(at..at + 2)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u16::from_ne_bytes)
}

/// Reads a native-endian `u32` at `at`, 0 when out of bounds (callers check lengths first).
fn u32_at(buf: &[u8], at: usize) -> u32 {
    buf.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

/// Builds an `inet_diag_req_v2` request into `out`: family, TCP, `states`, and the socket id
/// (zeros for a dump). `flags` are the netlink flags.
fn build_request(
    out: &mut [u8; REQUEST_LEN],
    seq: u32,
    flags: u16,
    family: u8,
    states: u32,
    id: Option<(SocketAddr, SocketAddr)>,
) {
    out.fill(0);
    // struct nlmsghdr, host order.
    out[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
    out[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    out[6..8].copy_from_slice(&flags.to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel fills in ours.
    // struct inet_diag_req_v2.
    let req = &mut out[NLMSG_HDRLEN..];
    req[0] = family;
    req[1] = libc::IPPROTO_TCP as u8;
    // idiag_ext 0 (no extra attributes asked for), pad 0.
    req[4..8].copy_from_slice(&states.to_ne_bytes());
    // struct inet_diag_sockid at offset 8.
    let sockid = &mut req[8..];
    if let Some((local, remote)) = id {
        sockid[0..2].copy_from_slice(&local.port().to_be_bytes());
        sockid[2..4].copy_from_slice(&remote.port().to_be_bytes());
        let interface = match (local, remote) {
            (SocketAddr::V4(l), SocketAddr::V4(r)) => {
                sockid[4..8].copy_from_slice(&l.ip().octets());
                sockid[20..24].copy_from_slice(&r.ip().octets());
                0
            }
            (SocketAddr::V6(l), SocketAddr::V6(r)) => {
                sockid[4..20].copy_from_slice(&l.ip().octets());
                sockid[20..36].copy_from_slice(&r.ip().octets());
                l.scope_id()
            }
            // Excluded by the caller.
            _ => 0,
        };
        sockid[36..40].copy_from_slice(&interface.to_ne_bytes());
    }
    sockid[40..44].copy_from_slice(&NOCOOKIE.to_ne_bytes());
    sockid[44..48].copy_from_slice(&NOCOOKIE.to_ne_bytes());
}

impl SockDiag {
    /// Opens the netlink socket and probes that the kernel answers TCP diagnostics for IPv4
    /// (and whether it does for IPv6; see the module docs).
    ///
    /// # Errors
    ///
    /// A failing `socket`, `setsockopt`, `send` or `recv`, naming the step; `Unsupported`
    /// when the kernel has no TCP `inet_diag` handler for IPv4.
    pub fn open() -> io::Result<SockDiag> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if raw < 0 {
            return Err(context(
                "socket(NETLINK_SOCK_DIAG)",
                &io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT_SECS,
            tv_usec: 0,
        };
        // SAFETY: `timeout` is a readable `timeval` of the size passed; the fd is valid.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(context("SO_RCVTIMEO", &io::Error::last_os_error()));
        }
        let mut diag = SockDiag {
            fd,
            seq: 0,
            buf: vec![0; BUFFER_LEN].into_boxed_slice(),
            ipv6: false,
        };
        if !diag.probe(libc::AF_INET as u8, "probe IPv4")? {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "sock_diag: probe IPv4: the kernel has no TCP inet_diag handler (tcp_diag)",
            ));
        }
        diag.ipv6 = diag.probe(libc::AF_INET6 as u8, "probe IPv6")?;
        Ok(diag)
    }

    /// Whether a local TCP socket exists for exactly this 4-tuple (`local` = this host's side,
    /// e.g. VIP:80; `remote` = the client), in any state but `LISTEN` (`TIME_WAIT` and
    /// `SYN_RECV` included: see the module docs). IPv4 and IPv6; both addresses must be of the
    /// same family. One netlink round trip.
    ///
    /// # Errors
    ///
    /// `InvalidInput` when the families differ; `Unsupported` for IPv6 on a kernel without
    /// IPv6 socket diagnostics; a failing `send` / `recv` or any kernel error other than
    /// `ENOENT`, naming the 4-tuple and the step.
    pub fn tcp_connection_exists(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<bool> {
        Ok(self
            .tcp_state(local, remote)?
            .is_some_and(|state| state != state::LISTEN))
    }

    /// The state of the socket the kernel's exact lookup finds for (`local`, `remote`): a
    /// connection, or a listener on `local`; `None` when there is neither.
    pub(crate) fn tcp_state(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<Option<u8>> {
        let family = match (local.ip(), remote.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => libc::AF_INET as u8,
            (IpAddr::V6(_), IpAddr::V6(_)) => {
                if !self.ipv6 {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!(
                            "sock_diag: TCP {local} <- {remote}: the kernel has no IPv6 \
                             inet_diag handler"
                        ),
                    ));
                }
                libc::AF_INET6 as u8
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("sock_diag: TCP {local} <- {remote}: address families differ"),
                ));
            }
        };
        let seq = self.next_seq();
        let mut request = [0u8; REQUEST_LEN];
        build_request(
            &mut request,
            seq,
            NLM_F_REQUEST,
            family,
            STATES_BUT_LISTEN,
            Some((local, remote)),
        );
        let step = |what: &str| format!("TCP {local} <- {remote}: {what}");
        self.send(&request)
            .map_err(|e| context(&step("send"), &e))?;
        loop {
            match self.receive(seq).map_err(|e| context(&step("recv"), &e))? {
                Reply::Error(libc::ENOENT) => return Ok(None),
                // Not expected for an exact request (no NLM_F_ACK, no dump); wait for the
                // answer proper.
                Reply::Done | Reply::Error(0) => {}
                Reply::Error(errno) => {
                    return Err(context(
                        &step("kernel"),
                        &io::Error::from_raw_os_error(errno),
                    ));
                }
                Reply::Socket { state, ports } => {
                    if state != state::LISTEN && ports != (local.port(), remote.port()) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("sock_diag: {}: reply for ports {ports:?}", step("kernel")),
                        ));
                    }
                    return Ok(Some(state));
                }
            }
        }
    }

    /// Sends an empty TCP dump for `family`: `true` when the kernel ends it with
    /// `NLMSG_DONE`, `false` when it answers `ENOENT` (no handler).
    fn probe(&mut self, family: u8, what: &str) -> io::Result<bool> {
        let seq = self.next_seq();
        let mut request = [0u8; REQUEST_LEN];
        build_request(
            &mut request,
            seq,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            0,
            None,
        );
        self.send(&request).map_err(|e| context(what, &e))?;
        loop {
            match self.receive(seq).map_err(|e| context(what, &e))? {
                Reply::Done | Reply::Error(0) => return Ok(true),
                Reply::Error(libc::ENOENT) => return Ok(false),
                Reply::Error(errno) => {
                    return Err(context(what, &io::Error::from_raw_os_error(errno)));
                }
                // A socket listed anyway: skip until the end of the dump.
                Reply::Socket { .. } => {}
            }
        }
    }

    /// The next request's sequence number.
    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request to the kernel (netlink port 0, the socket's default destination).
    fn send(&self, request: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: `request` is readable for its length during the call; the fd is valid.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    request.as_ptr().cast(),
                    request.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Receives until a message of request `seq` arrives, and returns the first one. Messages
    /// of other sequence numbers (answers to an earlier request that failed half-way) are
    /// skipped. A datagram with several messages of ours (a dump) yields only its first one
    /// that decides: a socket, the end, or an error; further sockets of a dump are skipped by
    /// the caller calling again, which is fine for the empty probe dump.
    fn receive(&mut self, seq: u32) -> io::Result<Reply> {
        loop {
            // SAFETY: `buf` is writable for its length during the call; the fd is valid.
            // MSG_TRUNC makes the return value the datagram's full length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            let Ok(n) = usize::try_from(n) else {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            };
            if n > self.buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("reply of {n} bytes truncated to {}", self.buf.len()),
                ));
            }
            let mut replies = None;
            let mut offset = 0;
            while offset + NLMSG_HDRLEN <= n {
                let message = &self.buf[offset..n];
                let length = u32_at(message, 0) as usize;
                if length < NLMSG_HDRLEN || length > message.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("malformed netlink message (length {length})"),
                    ));
                }
                let kind = u16_at(message, 4);
                if u32_at(message, 8) == seq && replies.is_none() {
                    replies = Some(parse(kind, &message[NLMSG_HDRLEN..length])?);
                }
                offset += length.next_multiple_of(4);
            }
            if let Some(reply) = replies {
                return Ok(reply);
            }
        }
    }
}

/// Decodes one message of type `kind` with `payload` (after the netlink header).
fn parse(kind: u16, payload: &[u8]) -> io::Result<Reply> {
    match kind {
        NLMSG_ERROR => {
            let Some(bytes) = payload.get(0..4) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "short NLMSG_ERROR",
                ));
            };
            let error = i32::from_ne_bytes(bytes.try_into().unwrap_or_default());
            Ok(Reply::Error(error.saturating_neg()))
        }
        NLMSG_DONE => Ok(Reply::Done),
        SOCK_DIAG_BY_FAMILY if payload.len() >= DIAG_MSG_LEN => Ok(Reply::Socket {
            state: payload[1],
            // inet_diag_msg.id.idiag_sport / idiag_dport, big-endian, at offsets 4 and 6.
            ports: (
                u16::from_be_bytes([payload[4], payload[5]]),
                u16::from_be_bytes([payload[6], payload[7]]),
            ),
        }),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "unexpected netlink message type {other} ({} bytes)",
                payload.len()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::afpacket::testns::in_private_netns;

    /// A connected pair on `listen` (a fresh port): (listener, server side, client side).
    fn connected(listen: IpAddr) -> (TcpListener, TcpStream, TcpStream) {
        let listener = TcpListener::bind((listen, 0)).expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let target = if listen.is_unspecified() {
            SocketAddr::from((Ipv4Addr::LOCALHOST, port))
        } else {
            SocketAddr::new(listen, port)
        };
        let client = TcpStream::connect(target).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (listener, server, client)
    }

    /// Polls `tcp_state` until it returns `want`, for up to 2 s; returns the last answer.
    fn wait_for_state(
        diag: &mut SockDiag,
        local: SocketAddr,
        remote: SocketAddr,
        want: Option<u8>,
    ) -> Option<u8> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let got = diag.tcp_state(local, remote).expect("query");
            if got == want || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn request_layout_matches_the_kernel_structs() {
        let mut out = [0u8; REQUEST_LEN];
        let local: SocketAddr = "198.18.0.1:80".parse().unwrap();
        let remote: SocketAddr = "198.18.1.2:40000".parse().unwrap();
        build_request(&mut out, 7, NLM_F_REQUEST, 2, 0x12, Some((local, remote)));
        assert_eq!(u32_at(&out, 0), 72, "nlmsg_len");
        assert_eq!(u16_at(&out, 4), 20, "SOCK_DIAG_BY_FAMILY");
        assert_eq!(u16_at(&out, 6), 1, "NLM_F_REQUEST only");
        assert_eq!(u32_at(&out, 8), 7, "seq");
        assert_eq!(&out[16..20], &[2, 6, 0, 0], "AF_INET, TCP, no ext");
        assert_eq!(u32_at(&out, 20), 0x12, "states");
        assert_eq!(&out[24..28], &[0, 80, 0x9c, 0x40], "ports big-endian");
        assert_eq!(&out[28..32], &[198, 18, 0, 1], "src = local");
        assert_eq!(&out[44..48], &[198, 18, 1, 2], "dst = remote");
        assert_eq!(u32_at(&out, 60), 0, "interface");
        assert_eq!(&out[64..72], &[0xff; 8], "INET_DIAG_NOCOOKIE");
    }

    #[test]
    fn mixed_families_are_refused() {
        in_private_netns(|| {
            let mut diag = SockDiag::open().expect("open");
            let err = diag
                .tcp_connection_exists(
                    "127.0.0.1:80".parse().unwrap(),
                    "[::1]:4000".parse().unwrap(),
                )
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        });
    }

    /// The checks for one address family, on loopback address `lo`.
    fn exact_lookups(lo: IpAddr) {
        let mut diag = SockDiag::open().expect("open");
        let (listener, server, client) = connected(lo);
        let local = server.local_addr().expect("local");
        let remote = server.peer_addr().expect("peer");
        assert_eq!(local, listener.local_addr().expect("listener"));

        // The server side of the connection.
        assert!(diag.tcp_connection_exists(local, remote).expect("query"));
        assert_eq!(
            diag.tcp_state(local, remote).expect("query"),
            Some(state::ESTABLISHED)
        );
        // The client side is a connection of this host too, seen from its own side.
        assert!(diag.tcp_connection_exists(remote, local).expect("query"));

        // Another remote port: the exact lookup falls back to the listener -> false.
        let other = SocketAddr::new(remote.ip(), remote.port() ^ 0x5a5a);
        assert!(!diag.tcp_connection_exists(local, other).expect("query"));
        assert_eq!(
            diag.tcp_state(local, other).expect("query"),
            Some(state::LISTEN)
        );
        // The listener "alone" (remote unspecified): also false.
        let unspecified = SocketAddr::new(
            if lo.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            },
            0,
        );
        assert!(
            !diag
                .tcp_connection_exists(local, unspecified)
                .expect("query")
        );
        // A local port with nothing at all: ENOENT -> false.
        let nothing = SocketAddr::new(lo, 9);
        assert_eq!(diag.tcp_state(nothing, remote).expect("query"), None);
        assert!(!diag.tcp_connection_exists(nothing, remote).expect("query"));

        // The client closes first: the server side is in CLOSE_WAIT, still a connection.
        drop(client);
        assert_eq!(
            wait_for_state(&mut diag, local, remote, Some(state::CLOSE_WAIT)),
            Some(state::CLOSE_WAIT)
        );
        assert!(diag.tcp_connection_exists(local, remote).expect("query"));
        // Then the server: LAST_ACK, acknowledged at once on loopback -> gone. The listener
        // still answers the lookup, so the result is false via LISTEN.
        drop(server);
        assert_eq!(
            wait_for_state(&mut diag, local, remote, Some(state::LISTEN)),
            Some(state::LISTEN)
        );
        assert!(!diag.tcp_connection_exists(local, remote).expect("query"));

        // The server closes first (the usual HTTP case): its side ends in TIME_WAIT, which
        // counts as existing (see the module docs), after the listener is gone too.
        let (listener, server, client) = connected(lo);
        let local = server.local_addr().expect("local");
        let remote = server.peer_addr().expect("peer");
        drop(server);
        drop(client);
        drop(listener);
        assert_eq!(
            wait_for_state(&mut diag, local, remote, Some(state::TIME_WAIT)),
            Some(state::TIME_WAIT)
        );
        assert!(diag.tcp_connection_exists(local, remote).expect("query"));
        // Many queries on one socket: no leftover replies get in the way.
        for _ in 0..1000 {
            assert!(diag.tcp_connection_exists(local, remote).expect("query"));
            assert!(!diag.tcp_connection_exists(local, other).expect("query"));
        }
    }

    #[test]
    fn ipv4_exact_lookups() {
        in_private_netns(|| exact_lookups(Ipv4Addr::LOCALHOST.into()));
    }

    #[test]
    fn ipv6_exact_lookups() {
        in_private_netns(|| {
            if TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_err() {
                eprintln!("skipping: ::1 is not usable in the namespace");
                return;
            }
            exact_lookups(Ipv6Addr::LOCALHOST.into());
        });
    }

    #[test]
    fn ipv4_lookup_finds_a_dual_stack_connection() {
        in_private_netns(|| {
            if TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)).is_err() {
                eprintln!("skipping: no IPv6 in the namespace");
                return;
            }
            let mut diag = SockDiag::open().expect("open");
            // [::]:P with IPV6_V6ONLY off (the Linux default), an IPv4 client.
            let (_listener, server, _client) = connected(Ipv6Addr::UNSPECIFIED.into());
            let remote = server.peer_addr().expect("peer");
            let port = server.local_addr().expect("local").port();
            let SocketAddr::V6(mapped) = remote else {
                panic!("an IPv6 socket reports {remote}");
            };
            let client = SocketAddrV4::new(
                mapped.ip().to_ipv4_mapped().expect("v4-mapped"),
                mapped.port(),
            );
            let local = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
            assert!(
                diag.tcp_connection_exists(local.into(), client.into())
                    .expect("query")
            );
            // The v4-mapped IPv6 form finds it too.
            assert!(
                diag.tcp_connection_exists(server.local_addr().expect("local"), remote)
                    .expect("query")
            );
        });
    }
}
