//! The lab backend's real servers: an HTTP/1.1 server with keep-alive whose every answer is the
//! backend's name (`GET /whoami`: the client's address as seen here), and a UDP echo. `lb lab serve` runs them ([`serve_forever`]) inside each
//! backend namespace, bound to `0.0.0.0`, so they answer on the VIP (direct server return) and
//! on the backend's own address (health checks) alike.
//!
//! **Model.** One thread accepts (a non-blocking listener polled every [`ACCEPT_POLL`]), one
//! thread per connection serves it (blocking reads; requests in order, pipelined ones too), one
//! thread echoes UDP. Counters are atomics, readable at any time through
//! [`BackendServer::stats`].
//!
//! **UDP replies come from the address the datagram was sent to.** A socket bound to `0.0.0.0`
//! would otherwise reply from the address routing picks (the backend's own, since the VIP sits
//! on `lo`), and a client that sent to the VIP would get its echo from elsewhere. The echo reads
//! each datagram's destination (`IP_PKTINFO` / `IPV6_PKTINFO`) and sends the reply from it.
//!
//! **Invariants.** At most [`MAX_CONNECTIONS`] connections are served at once (more are closed
//! at once); a connection idle for [`IDLE_TIMEOUT`] is closed; a request head over
//! [`MAX_HEAD`] bytes is refused; request bodies are read and discarded, never buffered. When the
//! server stops (`stop` or drop), it stops accepting, shuts down every open connection (the
//! client sees the connection closed) and waits (at most [`STOP_WAIT`]) until their threads are
//! gone.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::mem::{self, MaybeUninit};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener,
    TcpStream, UdpSocket,
};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Most connections served at once; more are accepted and closed at once.
pub const MAX_CONNECTIONS: usize = 8192;

/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest request head (request line and headers) accepted; longer ones get a 431.
pub const MAX_HEAD: usize = 16 * 1024;

/// How often the accept thread looks for new connections when there were none.
pub const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// How long stopping waits for connection threads to finish after shutting their sockets down.
pub const STOP_WAIT: Duration = Duration::from_secs(5);

/// How often the UDP thread checks whether it should stop while no datagram arrives.
const UDP_POLL: Duration = Duration::from_millis(50);

/// A response write that makes no progress for this long fails (a client that stopped reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Stack size of connection threads: they only hold a small buffer.
const CONNECTION_STACK: usize = 128 * 1024;

/// Receive buffer asked for the UDP socket, so a busy machine's scheduling stalls do not drop
/// datagrams (which would read as the load balancer's loss).
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// A [`BackendServer`]'s counters, cumulative except `http_connections_open`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// HTTP connections open now.
    pub http_connections_open: u64,
    /// HTTP connections accepted and served since the start.
    pub http_connections_total: u64,
    /// HTTP requests answered (any status).
    pub http_requests: u64,
    /// UDP datagrams received (each is echoed).
    pub udp_datagrams: u64,
}

/// What the server's threads share.
struct Shared {
    /// The body of every 200 answer: the name and "\n".
    body: String,
    stop: AtomicBool,
    connections_total: AtomicU64,
    requests: AtomicU64,
    udp_datagrams: AtomicU64,
    /// Every open connection (by id): a handle on its socket, to shut it down when stopping.
    open: Mutex<HashMap<u64, TcpStream>>,
    /// Signalled when a connection thread ends.
    closed: Condvar,
}

/// The HTTP server and UDP echo of one lab backend; see the [module docs](self).
pub struct BackendServer {
    name: String,
    http: SocketAddr,
    udp: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl BackendServer {
    /// Binds `http` (TCP) and `udp` and starts serving; returns once both are bound. Port 0
    /// picks a free port: [`http_addr`](Self::http_addr) and [`udp_addr`](Self::udp_addr) tell
    /// which. `name` (the body of every answer) must not contain line breaks.
    pub fn start(name: &str, http: SocketAddr, udp: SocketAddr) -> io::Result<BackendServer> {
        if name.contains(['\r', '\n']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a server name cannot contain line breaks",
            ));
        }
        let listener = TcpListener::bind(http)?;
        listener.set_nonblocking(true)?;
        let socket = UdpSocket::bind(udp)?;
        socket.set_read_timeout(Some(UDP_POLL))?;
        enable_packet_info(&socket)?;
        set_receive_buffer(socket.as_raw_fd(), UDP_RECEIVE_BUFFER);
        let (http, udp) = (listener.local_addr()?, socket.local_addr()?);
        let shared = Arc::new(Shared {
            body: format!("{name}\n"),
            stop: AtomicBool::new(false),
            connections_total: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            udp_datagrams: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            closed: Condvar::new(),
        });
        let mut server = BackendServer {
            name: name.to_owned(),
            http,
            udp,
            shared: Arc::clone(&shared),
            threads: Vec::new(),
        };
        // On an error below, dropping `server` stops the threads already started.
        let accept = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("lab-http-{name}"))
                .spawn(move || accept_loop(&listener, &shared))?
        };
        server.threads.push(accept);
        let echo = thread::Builder::new()
            .name(format!("lab-udp-{name}"))
            .spawn(move || echo_loop(&socket, &shared))?;
        server.threads.push(echo);
        Ok(server)
    }

    /// The server's name, the body of its answers.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address the HTTP server listens on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// The address the UDP echo is bound to.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp
    }

    /// The counters now.
    pub fn stats(&self) -> ServerStats {
        let open = self
            .shared
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        ServerStats {
            http_connections_open: open as u64,
            http_connections_total: self.shared.connections_total.load(Ordering::Relaxed),
            http_requests: self.shared.requests.load(Ordering::Relaxed),
            udp_datagrams: self.shared.udp_datagrams.load(Ordering::Relaxed),
        }
    }

    /// Stops serving: closes the listener and the UDP socket, shuts down every open
    /// connection, and waits (at most [`STOP_WAIT`]) for their threads to end. Dropping the
    /// server does the same. Returns the final counters (`http_connections_open` counts the
    /// connections whose threads did not end in time, normally none).
    pub fn stop(mut self) -> ServerStats {
        self.finish();
        self.stats()
    }

    fn finish(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // The accept thread first: once it is gone, no connection can be added to `open`.
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let mut open = self
            .shared
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for stream in open.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + STOP_WAIT;
        while !open.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    server = %self.name,
                    open = open.len(),
                    "connection threads did not end"
                );
                break;
            }
            open = self
                .shared
                .closed
                .wait_timeout(open, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for BackendServer {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Runs a [`BackendServer`] until SIGTERM or SIGINT (SIGHUP is ignored), then stops it.
/// `lb lab serve` runs this in each backend namespace.
pub fn serve_forever(name: &str, http: SocketAddr, udp: SocketAddr) -> io::Result<()> {
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    lb_dataplane::process::handle_signals(Arc::new(AtomicBool::new(false)), move || {
        let _ = stop_tx.send(());
    })
    .map_err(io::Error::other)?;
    let server = BackendServer::start(name, http, udp)?;
    tracing::info!(
        name,
        http = %server.http_addr(),
        udp = %server.udp_addr(),
        "lab server running"
    );
    // Err only if the signal thread is gone, which it never is while the process lives.
    let _ = stop_rx.recv();
    let stats = server.stop();
    tracing::info!(name, ?stats, "lab server stopped");
    Ok(())
}

/// Accepts connections until told to stop; each gets its own thread.
fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut next_id: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                next_id += 1;
                admit(stream, next_id, shared);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors or memory: wait for connections to go away.
                tracing::warn!(error = %e, "accept failed");
                thread::sleep(ACCEPT_POLL * 10);
            }
        }
    }
}

/// Registers `stream` in `open` and starts its thread, unless the server is full.
fn admit(stream: TcpStream, id: u64, shared: &Arc<Shared>) {
    let configured = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_read_timeout(Some(IDLE_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
        .and_then(|()| stream.try_clone());
    let Ok(handle) = configured else {
        return;
    };
    {
        let mut open = shared.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.len() >= MAX_CONNECTIONS {
            return;
        }
        open.insert(id, handle);
    }
    shared.connections_total.fetch_add(1, Ordering::Relaxed);
    let thread_shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name("lab-http-conn".into())
        .stack_size(CONNECTION_STACK)
        .spawn(move || {
            let _ = serve_connection(stream, &thread_shared);
            forget_connection(&thread_shared, id);
        });
    if spawned.is_err() {
        // The closure, and with it the stream, is dropped: the connection is closed.
        forget_connection(shared, id);
    }
}

/// Removes a finished connection from `open` (closing the last handle on its socket).
fn forget_connection(shared: &Shared, id: u64) {
    let handle = shared
        .open
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
    drop(handle);
    shared.closed.notify_all();
}

/// What a request head asks for, as far as the answer is concerned.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    /// HEAD: the answer has no body.
    head_only: bool,
    /// `GET /whoami`: the answer is the client's address as this server saw it (the lab's
    /// SNAT experiment asks the internet host which source it saw).
    whoami: bool,
    /// Body bytes that follow the head.
    content_length: usize,
    /// The connection stays open after the answer.
    keep_alive: bool,
    /// The client waits for `100 Continue` before sending the body.
    expect_continue: bool,
}

/// The path whose answer is the client's address (`ip:port`) instead of the server's name.
pub const WHOAMI_PATH: &str = "/whoami";

/// Parses a request head (without its final empty line); `Err` is the status to answer with.
fn parse_head(head: &[u8]) -> Result<Request, u16> {
    let text = std::str::from_utf8(head).map_err(|_| 400u16)?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(400);
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(505),
    };
    let mut request = Request {
        head_only: method == "HEAD",
        whoami: target == WHOAMI_PATH,
        content_length: 0,
        keep_alive: http11,
        expect_continue: false,
    };
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(400u16)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            request.content_length = value.parse().map_err(|_| 400u16)?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(501);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    request.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") && !http11 {
                    request.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") && value.eq_ignore_ascii_case("100-continue")
        {
            request.expect_continue = true;
        }
    }
    Ok(request)
}

/// The reason phrase of the statuses this server answers with.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// Writes one answer: `body` with `status`, announcing whether the connection stays open.
fn respond(
    stream: &mut TcpStream,
    status: u16,
    body: &str,
    send_body: bool,
    keep_alive: bool,
) -> io::Result<()> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut answer = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: {connection}\r\n\r\n",
        reason(status),
        body.len()
    );
    if send_body {
        answer.push_str(body);
    }
    stream.write_all(answer.as_bytes())
}

/// Serves one connection until the client closes it, asks to, breaks a rule, idles too long,
/// or the server stops.
fn serve_connection(mut stream: TcpStream, shared: &Shared) -> io::Result<()> {
    let mut buffered: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        // Empty lines before a request line are allowed (RFC 9112 section 2.2).
        while buffered.starts_with(b"\r\n") {
            buffered.drain(..2);
        }
        let head_end = loop {
            if let Some(end) = find(&buffered, b"\r\n\r\n") {
                break end;
            }
            if buffered.len() > MAX_HEAD {
                shared.requests.fetch_add(1, Ordering::Relaxed);
                return respond(&mut stream, 431, "", false, false);
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buffered.extend_from_slice(&chunk[..n]);
        };
        let request = parse_head(&buffered[..head_end]);
        buffered.drain(..head_end + 4);
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let request = match request {
            Ok(request) => request,
            Err(status) => return respond(&mut stream, status, "", false, false),
        };
        if request.expect_continue && request.content_length > 0 {
            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let mut remaining = request.content_length;
        let from_buffer = remaining.min(buffered.len());
        buffered.drain(..from_buffer);
        remaining -= from_buffer;
        while remaining > 0 {
            let want = remaining.min(chunk.len());
            let n = stream.read(&mut chunk[..want])?;
            if n == 0 {
                return Ok(());
            }
            remaining -= n;
        }
        let body: std::borrow::Cow<'_, str> = if request.whoami {
            stream
                .peer_addr()
                .map_or_else(|e| format!("? ({e})\n"), |peer| format!("{peer}\n"))
                .into()
        } else {
            shared.body.as_str().into()
        };
        respond(
            &mut stream,
            200,
            &body,
            !request.head_only,
            request.keep_alive,
        )?;
        if !request.keep_alive {
            return Ok(());
        }
    }
}

/// The offset of the first occurrence of `needle` in `haystack`.
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Echoes datagrams until told to stop.
fn echo_loop(socket: &UdpSocket, shared: &Shared) {
    let mut buf = vec![0u8; 65_536];
    while !shared.stop.load(Ordering::Relaxed) {
        match receive_with_destination(socket, &mut buf) {
            Ok((len, from, to)) => {
                shared.udp_datagrams.fetch_add(1, Ordering::Relaxed);
                if send_from(socket, &buf[..len], from, to).is_err() {
                    // E.g. the address it was sent to is a broadcast one: reply as routing says.
                    let _ = socket.send_to(&buf[..len], from);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                tracing::warn!(error = %e, "UDP receive failed");
                thread::sleep(UDP_POLL);
            }
        }
    }
}

/// Asks the kernel for each datagram's destination address (`IP_PKTINFO` or
/// `IPV6_RECVPKTINFO`, by the socket's family).
fn enable_packet_info(socket: &UdpSocket) -> io::Result<()> {
    let (level, name) = if socket.local_addr()?.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    };
    set_int_option(socket.as_raw_fd(), level, name, 1)
}

/// Sets an integer socket option.
fn set_int_option(fd: RawFd, level: libc::c_int, name: libc::c_int, value: i32) -> io::Result<()> {
    let value: libc::c_int = value;
    // SAFETY: setsockopt reads `value`, a c_int of the length given, during the call only.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks for a receive buffer of `bytes`: beyond `net.core.rmem_max` if the process may
/// (`SO_RCVBUFFORCE`, CAP_NET_ADMIN), else up to it. Best effort: a smaller buffer still works.
pub(crate) fn set_receive_buffer(fd: RawFd, bytes: usize) {
    let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
    if set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes).is_err() {
        let _ = set_int_option(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes);
    }
}

/// Control message space for one `in_pktinfo` or `in6_pktinfo`, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuffer([u8; 64]);

// SAFETY: CMSG_SPACE only computes a size from its argument.
const _: () = assert!(unsafe { libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) } <= 64);
// SAFETY: as above.
const _: () = assert!(unsafe { libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) } <= 64);

/// Receives one datagram: its length, its sender, and the address it was sent to (if the
/// kernel said).
fn receive_with_destination(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    let mut from = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = ControlBuffer([0; 64]);
    // SAFETY: msghdr is plain data for which all zeroes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = from.as_mut_ptr().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: every pointer in `msg` (name, one iovec over `buf`, control) points to memory
    // valid for writes of the lengths given, for the whole call.
    let len = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, 0) };
    let Ok(len) = usize::try_from(len) else {
        return Err(io::Error::last_os_error());
    };
    // SAFETY: recvmsg filled `from` (it was zeroed, so any bytes it left are defined).
    let from = unsafe { from.assume_init() };
    let from = socket_addr(&from)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "sender of unknown family"))?;
    let mut to = None;
    // SAFETY: recvmsg set msg_controllen to the bytes of control messages it wrote into
    // `control`; CMSG_FIRSTHDR and CMSG_NXTHDR stay within them, and each message's data is
    // read (unaligned) only when its level and type say it holds the structure read.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            let header = &*cmsg;
            let data = libc::CMSG_DATA(cmsg);
            if header.cmsg_level == libc::IPPROTO_IP && header.cmsg_type == libc::IP_PKTINFO {
                let info = ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                to = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_addr.s_addr,
                ))));
            } else if header.cmsg_level == libc::IPPROTO_IPV6
                && header.cmsg_type == libc::IPV6_PKTINFO
            {
                let info = ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                to = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((len, from, to))
}

/// Sends `data` to `to` from source address `from` (when known, unicast and of the socket's
/// family), else as routing says.
fn send_from(
    socket: &UdpSocket,
    data: &[u8],
    to: SocketAddr,
    from: Option<IpAddr>,
) -> io::Result<usize> {
    let from = from.filter(|a| match a {
        IpAddr::V4(a) => !a.is_unspecified() && !a.is_multicast() && !a.is_broadcast(),
        IpAddr::V6(a) => !a.is_unspecified() && !a.is_multicast() && a.to_ipv4_mapped().is_none(),
    });
    let Some(from) = from else {
        return socket.send_to(data, to);
    };
    let (mut name, name_len) = sockaddr(to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut control = ControlBuffer([0; 64]);
    // SAFETY: msghdr is plain data for which all zeroes is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&raw mut name).cast();
    msg.msg_namelen = name_len;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    let (level, kind, size) = match from {
        IpAddr::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            size_of::<libc::in_pktinfo>(),
        ),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            size_of::<libc::in6_pktinfo>(),
        ),
    };
    // SAFETY: CMSG_SPACE only computes a size (at most 64, checked at compile time above).
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size as u32) } as _;
    // SAFETY: `control` is aligned for cmsghdr and holds CMSG_SPACE(size) bytes (checked at
    // compile time), so the header and `size` bytes of data written here fit in it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size as u32) as _;
        let data = libc::CMSG_DATA(cmsg);
        match from {
            IpAddr::V4(a) => ptr::write_unaligned(
                data.cast::<libc::in_pktinfo>(),
                libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(a).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                },
            ),
            IpAddr::V6(a) => ptr::write_unaligned(
                data.cast::<libc::in6_pktinfo>(),
                libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: a.octets(),
                    },
                    ipi6_ifindex: 0,
                },
            ),
        }
    }
    // SAFETY: every pointer in `msg` points to memory valid for reads of the lengths given
    // (the destination, one iovec over `data`, the control message) for the whole call.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &raw const msg, 0) };
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

/// A std address from a `sockaddr_storage` the kernel filled, if IPv4 or IPv6.
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in; sockaddr_storage is
            // large and aligned enough for any sockaddr.
            let a = unsafe { ptr::read((&raw const *storage).cast::<libc::sockaddr_in>()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { ptr::read((&raw const *storage).cast::<libc::sockaddr_in6>()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A `sockaddr_storage` holding `addr`, and the length of the address in it.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data for which all zeroes is valid.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            unsafe { ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in6.
            unsafe { ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn read_answer(stream: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = find(&got, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_string();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if got.len() >= end + 4 + length {
                    return String::from_utf8_lossy(&got).to_string();
                }
            }
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "closed before a whole answer: {got:?}");
            got.extend_from_slice(&chunk[..n]);
        }
    }

    #[test]
    fn parses_heads() {
        let parse = |s: &str| parse_head(s.as_bytes());
        let get = parse("GET / HTTP/1.1\r\nHost: lab").unwrap();
        assert!(get.keep_alive && !get.head_only && get.content_length == 0);
        assert!(
            !parse("GET / HTTP/1.1\r\nConnection: Close")
                .unwrap()
                .keep_alive
        );
        assert!(!parse("GET / HTTP/1.0").unwrap().keep_alive);
        assert!(
            parse("GET / HTTP/1.0\r\nconnection: keep-alive")
                .unwrap()
                .keep_alive
        );
        let post = parse("POST /x HTTP/1.1\r\ncontent-length: 12\r\nExpect: 100-continue").unwrap();
        assert_eq!(post.content_length, 12);
        assert!(post.expect_continue);
        assert!(parse("HEAD / HTTP/1.1").unwrap().head_only);
        assert_eq!(parse("GET / HTTP/2"), Err(505));
        assert_eq!(parse("GET /"), Err(400));
        assert_eq!(parse("GET / HTTP/1.1\r\nno colon"), Err(400));
        assert_eq!(parse("GET / HTTP/1.1\r\nContent-Length: x"), Err(400));
        assert_eq!(
            parse("POST / HTTP/1.1\r\nTransfer-Encoding: chunked"),
            Err(501)
        );
    }

    #[test]
    fn keep_alive_pipelining_bodies_and_close() {
        let server = BackendServer::start("be1", local(), local()).unwrap();
        let mut c = TcpStream::connect(server.http_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for _ in 0..3 {
            c.write_all(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n").unwrap();
            let answer = read_answer(&mut c);
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
            assert!(answer.ends_with("\r\n\r\nbe1\n"), "{answer}");
        }
        // Two pipelined requests, the first with a body, in one write.
        c.write_all(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n")
            .unwrap();
        let first = read_answer(&mut c);
        assert!(first.ends_with("be1\n"), "{first}");
        let stats = server.stats();
        assert_eq!(stats.http_connections_open, 1);
        assert_eq!(stats.http_connections_total, 1);
        // The second answer may have arrived with the first; `read_answer` stops after one.
        assert!(stats.http_requests >= 4);
        drop(c);

        // What tests/common's http_get does: HTTP/1.0, a 20 kB body, read to the end.
        let mut c = TcpStream::connect(server.http_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let upload = "x".repeat(20_000);
        write!(
            c,
            "POST / HTTP/1.0\r\nContent-Length: {}\r\n\r\n{upload}",
            upload.len()
        )
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert!(answer.contains("Connection: close\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nbe1\n"), "{answer}");

        let deadline = Instant::now() + Duration::from_secs(5);
        while server.stats().http_connections_open > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(server.stats().http_connections_open, 0);
        assert_eq!(server.stats().http_connections_total, 2);
    }

    #[test]
    fn stop_closes_open_connections() {
        let server = BackendServer::start("be1", local(), local()).unwrap();
        let mut c = TcpStream::connect(server.http_addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        read_answer(&mut c);
        let started = Instant::now();
        let stats = server.stop();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(stats.http_connections_open, 0);
        assert_eq!(stats.http_requests, 1);
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
    }

    /// The echo answers from the address the datagram was sent to, not the one routing would
    /// pick: sent to 127.0.0.2 (all of 127/8 is local), the echo comes from 127.0.0.2.
    #[test]
    fn udp_echo_replies_from_the_destination_address() {
        let server = BackendServer::start("be1", local(), "0.0.0.0:0".parse().unwrap()).unwrap();
        let port = server.udp_addr().port();
        let client = UdpSocket::bind(local()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        for to in ["127.0.0.2", "127.0.0.1"] {
            let to = SocketAddr::new(to.parse().unwrap(), port);
            client.send_to(b"ping", to).unwrap();
            let mut buf = [0u8; 16];
            let (n, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"ping");
            assert_eq!(from, to);
        }
        assert_eq!(server.stats().udp_datagrams, 2);
    }
}
