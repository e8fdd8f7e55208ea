//! Next hops for AF_XDP transmission: for each destination the mux sends to (its backends), the
//! interface the kernel would send from and the Ethernet addresses to put on the frame, read
//! from the kernel's routing and neighbour tables over rtnetlink (`RTM_GETROUTE` for the route,
//! an `RTM_GETNEIGH` dump for the neighbours, `RTM_GETLINK` for the interfaces' own addresses).
//!
//! A [`Resolver`] thread refreshes the table every [`REFRESH`] and when the destinations change
//! (a new snapshot), and publishes it whole through an `ArcSwap`; workers load it once per
//! batch. A destination whose neighbour entry is missing or unusable (`INCOMPLETE`, `FAILED`)
//! is left out: the worker sends its packets through the raw-socket path, which makes the
//! kernel resolve it, and the next refresh picks the answer up.
//!
//! **Invariant.** A published table only holds usable entries: a route with an output
//! interface and a neighbour in state REACHABLE, STALE, DELAY, PROBE, PERMANENT or NOARP with
//! a 6-byte link-layer address. A MAC that changes is used until the next refresh (at most
//! [`REFRESH`]), as the kernel's own neighbour cache would for a STALE entry.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use arc_swap::ArcSwap;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use xxhash_rust::xxh3::Xxh3Builder;

/// How often the table is read again from the kernel.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Where a packet to one destination leaves, and with which Ethernet addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// The output interface.
    pub ifindex: u32,
    /// The interface's own MAC (the frame's source).
    pub source: [u8; 6],
    /// The next hop's MAC (the frame's destination).
    pub destination: [u8; 6],
}

/// Destinations with a usable next hop.
#[derive(Clone, Debug, Default)]
pub struct NextHops {
    by_destination: HashMap<IpAddr, NextHop, Xxh3Builder>,
}

impl NextHops {
    /// The next hop of `destination`, if it is resolved.
    #[inline]
    #[must_use]
    pub fn get(&self, destination: IpAddr) -> Option<&NextHop> {
        self.by_destination.get(&destination)
    }

    /// Resolved destinations.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_destination.len()
    }

    /// No destination is resolved.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_destination.is_empty()
    }
}

/// An rtnetlink connection.
struct Rtnl {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        set_receive_timeout(&socket, Duration::from_secs(2))?;
        Ok(Self {
            socket,
            sequence: 0,
            buffer: vec![0; 64 * 1024],
        })
    }

    /// Sends `message` and collects the answers until the kernel is done (or, for a
    /// non-dump request, after the one answer).
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        dump: bool,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0)?;
        let mut answers = Vec::new();
        loop {
            let n = self.socket.recv(&mut &mut self.buffer[..], 0)?;
            let mut at = 0;
            while at < n {
                let bytes = &self.buffer[at..n];
                let message =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink: {e}"))
                    })?;
                let length = message.header.length as usize;
                if length == 0 {
                    break;
                }
                at += length;
                if message.header.sequence_number != self.sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => {
                        answers.push(inner);
                        if !dump {
                            return Ok(answers);
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(answers),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// The output interface and next-hop address of `destination`.
    fn route(&mut self, destination: IpAddr) -> io::Result<Option<(u32, IpAddr)>> {
        let mut message = RouteMessage::default();
        message.header.address_family = family(destination);
        message.header.destination_prefix_length = if destination.is_ipv4() { 32 } else { 128 };
        message
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::from(destination)));
        let answers = match self.request(RouteNetlinkMessage::GetRoute(message), false) {
            Ok(a) => a,
            // No route: the raw path reports it.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH)
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        for answer in answers {
            if let RouteNetlinkMessage::NewRoute(route) = answer {
                let mut oif = None;
                let mut gateway = None;
                for attribute in route.attributes {
                    match attribute {
                        RouteAttribute::Oif(i) => oif = Some(i),
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => {
                            gateway = Some(IpAddr::V4(a));
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet6(a)) => {
                            gateway = Some(IpAddr::V6(a));
                        }
                        _ => {}
                    }
                }
                return Ok(oif.map(|i| (i, gateway.unwrap_or(destination))));
            }
        }
        Ok(None)
    }

    /// Every usable neighbour entry: (interface, address) -> MAC.
    fn neighbours(&mut self) -> io::Result<HashMap<(u32, IpAddr), [u8; 6], Xxh3Builder>> {
        let mut table = HashMap::with_hasher(Xxh3Builder::new());
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut message = NeighbourMessage::default();
            message.header.family = family;
            for answer in self.request(RouteNetlinkMessage::GetNeighbour(message), true)? {
                let RouteNetlinkMessage::NewNeighbour(n) = answer else {
                    continue;
                };
                if !usable(n.header.state) {
                    continue;
                }
                let mut address = None;
                let mut mac = None;
                for attribute in n.attributes {
                    match attribute {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                            address = Some(IpAddr::V4(a));
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                            address = Some(IpAddr::V6(a));
                        }
                        NeighbourAttribute::LinkLayerAddress(l) => {
                            mac = <[u8; 6]>::try_from(l.as_slice()).ok();
                        }
                        _ => {}
                    }
                }
                if let (Some(a), Some(m)) = (address, mac) {
                    table.insert((n.header.ifindex, a), m);
                }
            }
        }
        Ok(table)
    }
}

fn usable(state: NeighbourState) -> bool {
    matches!(
        state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    )
}

fn family(address: IpAddr) -> AddressFamily {
    if address.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn set_receive_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    crate::afpacket::set_option(socket, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)
}

#[cfg(test)]
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// What AF_XDP needs to know of an interface, read over rtnetlink (so it is the interface of
/// the calling thread's network namespace, whatever /sys shows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// The interface index.
    pub index: u32,
    /// Its MTU.
    pub mtu: u32,
    /// Its receive queues.
    pub rx_queues: u32,
    /// Its Ethernet address, if it has a 6-byte one.
    pub mac: Option<[u8; 6]>,
}

impl Rtnl {
    fn link(&mut self, index: u32) -> io::Result<LinkInfo> {
        let mut message = LinkMessage::default();
        message.header.index = index;
        let mut info = LinkInfo {
            index,
            mtu: 1500,
            rx_queues: 1,
            mac: None,
        };
        for answer in self.request(RouteNetlinkMessage::GetLink(message), false)? {
            if let RouteNetlinkMessage::NewLink(link) = answer {
                for attribute in link.attributes {
                    match attribute {
                        LinkAttribute::Mtu(m) => info.mtu = m,
                        LinkAttribute::NumRxQueues(q) => info.rx_queues = q.max(1),
                        LinkAttribute::Address(a) => {
                            info.mac = <[u8; 6]>::try_from(a.as_slice()).ok();
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(info)
    }
}

/// The index, MTU, receive queues and MAC of interface `name`.
pub fn link_info(name: &str) -> io::Result<LinkInfo> {
    let c = std::ffi::CString::new(name).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL byte")
    })?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Rtnl::open()?.link(index)
}

/// Reads the next hops of `destinations` once.
pub fn resolve(destinations: &[IpAddr]) -> io::Result<NextHops> {
    let mut rtnl = Rtnl::open()?;
    resolve_with(&mut rtnl, destinations)
}

fn resolve_with(rtnl: &mut Rtnl, destinations: &[IpAddr]) -> io::Result<NextHops> {
    let neighbours = rtnl.neighbours()?;
    let mut macs: HashMap<u32, Option<[u8; 6]>> = HashMap::new();
    let mut out = NextHops::default();
    for &destination in destinations {
        let Some((ifindex, via)) = rtnl.route(destination)? else {
            continue;
        };
        let source = match macs.get(&ifindex) {
            Some(&m) => m,
            None => {
                let m = rtnl.link(ifindex)?.mac;
                macs.insert(ifindex, m);
                m
            }
        };
        let (Some(source), Some(&mac)) = (source, neighbours.get(&(ifindex, via))) else {
            continue;
        };
        out.by_destination.insert(
            destination,
            NextHop {
                ifindex,
                source,
                destination: mac,
            },
        );
    }
    Ok(out)
}

/// A thread that keeps the next hops of a set of destinations up to date.
#[derive(Debug)]
pub struct Resolver {
    table: Arc<ArcSwap<NextHops>>,
    destinations: Arc<ArcSwap<Vec<IpAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Resolver {
    /// Starts resolving `destinations` (resolved once before this returns).
    pub fn start(destinations: Vec<IpAddr>) -> io::Result<Self> {
        let mut rtnl = Rtnl::open()?;
        let table = Arc::new(ArcSwap::from_pointee(resolve_with(
            &mut rtnl,
            &destinations,
        )?));
        let destinations = Arc::new(ArcSwap::from_pointee(destinations));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (table, destinations, stop) = (
                Arc::clone(&table),
                Arc::clone(&destinations),
                Arc::clone(&stop),
            );
            thread::Builder::new().name("lb-neighbours".into()).spawn(move || {
                let mut failing = false;
                while !stop.load(Ordering::Relaxed) {
                    // Sleep in short steps so that stop and a change of destinations are quick.
                    let wanted = destinations.load_full();
                    for _ in 0..(REFRESH.as_millis() / 50) {
                        if stop.load(Ordering::Relaxed) || !Arc::ptr_eq(&wanted, &destinations.load_full()) {
                            break;
                        }
                        thread::sleep(Duration::from_millis(50));
                    }
                    match resolve_with(&mut rtnl, &destinations.load()) {
                        Ok(t) => {
                            if failing {
                                tracing::info!("next-hop resolution works again");
                            }
                            failing = false;
                            table.store(Arc::new(t));
                        }
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!(error = %e, "next-hop resolution failed; keeping the last table");
                        }
                        Err(_) => {}
                    }
                }
            })?
        };
        Ok(Self {
            table,
            destinations,
            stop,
            thread: Some(thread),
        })
    }

    /// The published table, for the workers.
    #[must_use]
    pub fn table(&self) -> Arc<ArcSwap<NextHops>> {
        Arc::clone(&self.table)
    }

    /// Resolves `destinations` from now on (the first answer within 50 ms or so).
    pub fn set_destinations(&self, destinations: Vec<IpAddr>) {
        if **self.destinations.load() != destinations {
            self.destinations.store(Arc::new(destinations));
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("02:00:c6:12:28:01"),
            Some([2, 0, 0xc6, 0x12, 0x28, 1])
        );
        assert_eq!(parse_mac("02:00:c6:12:28"), None);
        assert_eq!(parse_mac("02:00:c6:12:28:01:05"), None);
        assert_eq!(parse_mac("zz:00:c6:12:28:01"), None);
        assert_eq!(parse_mac(""), None);
    }
}
