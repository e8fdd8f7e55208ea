//! `lb agent`'s TUN offloads in network namespaces (root): real TCP from the client through the
//! router and a real `lb mux` to a backend whose agent decapsulates and delivers through its TUN.
//! 100 MB cross intact (the server checks every byte against the sender's pseudo-random stream),
//! and the agent's counters show that its TCP segments were coalesced: fewer TUN writes than
//! packets delivered.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::Duration;

use lb::netns::{Lab, require_root};
use lb::topology::{Fleet, FleetPlan};
use lb_dataplane::socket::request;
use serde_json::{Value, json};

const PORT: u16 = 9000;
/// What the client sends: 100 MB.
const BYTES: u64 = 100 * 1000 * 1000;

/// The sender's stream of bytes: xorshift64*, eight bytes per step, the same however it is cut
/// into buffers.
struct Stream {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Stream {
    fn new() -> Stream {
        Stream {
            state: 0x9E37_79B9_7F4A_7C15,
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.word = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

fn status(socket: &std::path::Path) -> Value {
    request(socket, &json!({"command": "status"})).expect("agent status")
}

#[test]
fn bulk_tcp_through_mux_and_agent_is_intact_and_coalesced() {
    require_root("agent_offload_netns::bulk_tcp_through_mux_and_agent_is_intact_and_coalesced");
    let mut lab = Lab::new("agentgso").unwrap();
    let fleet = Fleet::build(
        &mut lab,
        &FleetPlan {
            muxes: 1,
            backends: 1,
            resilient: false,
            ipv6: false,
        },
    )
    .unwrap();
    fleet.add_backend_vips().unwrap();
    let vip = format!(
        "\n[[vip]]\nname = \"bulk\"\naddress = \"{}\"\nprotocol = \"tcp\"\nport = {PORT}\nencap = \"ipip\"\n  [[vip.backend]]\n  address = \"{}\"\n",
        Fleet::VIP,
        Fleet::backend_address(1)
    );
    let agent = common::start_node(
        &mut lab,
        &fleet.backends[0],
        "agent",
        "agent1",
        &format!(
            "[node]\nname = \"be1\"\ninterface = \"b0\"\naddress_v4 = \"{}\"\ncontrol_socket = SOCKET\n[agent]\nmuxes = [\"{}/32\"]\n{vip}",
            Fleet::backend_address(1),
            Fleet::mux_address(1),
        ),
        &["--no-metrics"],
    );
    common::start_node(
        &mut lab,
        &fleet.muxes[0],
        "mux",
        "mux1",
        &format!(
            "[node]\nname = \"mux1\"\ninterface = \"m0\"\naddress_v4 = \"{}\"\nmtu = 1600\ncontrol_socket = SOCKET\n{vip}",
            Fleet::mux_address(1),
        ),
        &["--no-metrics"],
    );
    let before = status(&agent.socket)["counters"].clone();

    // The server: checks every byte against the stream, bounded by a read time-out.
    let listening = std::sync::mpsc::channel::<()>();
    let server = fleet.backends[0].enter(move || -> Result<u64, String> {
        let listener = TcpListener::bind(SocketAddrV4::new(Fleet::VIP, PORT))
            .map_err(|e| format!("bind: {e}"))?;
        listening.0.send(()).map_err(|e| e.to_string())?;
        let (mut conn, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let total = read_checked(&mut conn)?;
        conn.write_all(&total.to_be_bytes())
            .map_err(|e| e.to_string())?;
        Ok(total)
    });
    listening
        .1
        .recv_timeout(Duration::from_secs(5))
        .expect("server listening");

    let client = fleet.client.enter(move || -> Result<(), String> {
        let to = SocketAddr::from(SocketAddrV4::new(Fleet::VIP, PORT));
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        conn.set_write_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let mut stream = Stream::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut sent = 0u64;
        while sent < BYTES {
            let n = (BYTES - sent).min(buf.len() as u64) as usize;
            stream.fill(&mut buf[..n]);
            conn.write_all(&buf[..n])
                .map_err(|e| format!("write at {sent}: {e}"))?;
            sent += n as u64;
        }
        conn.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        let mut answer = [0u8; 8];
        conn.read_exact(&mut answer)
            .map_err(|e| format!("the server's count: {e}"))?;
        if u64::from_be_bytes(answer) != BYTES {
            return Err(format!("server counted {}", u64::from_be_bytes(answer)));
        }
        Ok(())
    });
    let sent = client.join().expect("client thread");
    let received = server.join().expect("server thread");
    assert_eq!(received, Ok(BYTES), "the server got every byte, in order");
    assert_eq!(sent, Ok(()), "client");

    // The agent's counters: everything delivered, in fewer writes than packets.
    std::thread::sleep(Duration::from_millis(1200));
    let after = status(&agent.socket)["counters"].clone();
    let moved = |key: &str| after[key].as_u64().unwrap() - before[key].as_u64().unwrap();
    let (delivered, writes, coalesced) = (
        moved("delivered"),
        moved("tun_writes"),
        moved("tun_coalesced"),
    );
    eprintln!(
        "agent: {delivered} packets delivered in {writes} TUN writes ({coalesced} coalesced)"
    );
    // 100 MB in segments of at most 1448 bytes.
    assert!(delivered >= BYTES / 1460, "delivered {delivered}: {after}");
    assert!(
        writes < delivered,
        "coalesced: {writes} writes for {delivered} packets: {after}"
    );
    assert!(coalesced > 0, "{after}");
    assert_eq!(after["tun_errors"], 0, "{after}");
}

/// Egress SNAT with the TUN's offloads: a backend uploads 20 MB to the internet host. The
/// kernel hands the agent TCP GSO packets through the TUN; the agent cuts them into wire
/// segments with full checksums, translates each and sends it: the internet host receives every
/// byte, in order, from the VIP.
#[test]
fn bulk_egress_through_the_tun_is_cut_from_gso_packets_and_arrives_intact() {
    require_root(
        "agent_offload_netns::bulk_egress_through_the_tun_is_cut_from_gso_packets_and_arrives_intact",
    );
    const UPLOAD: u64 = 20 * 1000 * 1000;
    const SINK: u16 = 7100;
    let mut lab = Lab::new("agentgsoout").unwrap();
    let fleet = Fleet::build(
        &mut lab,
        &FleetPlan {
            muxes: 1,
            backends: 1,
            resilient: false,
            ipv6: false,
        },
    )
    .unwrap();
    fleet.add_backend_vips().unwrap();
    let internet = fleet.add_internet(&mut lab).unwrap();
    let vips = format!(
        "\n[[vip]]\nname = \"web\"\naddress = \"{vip}\"\nprotocol = \"tcp\"\nport = 80\nencap = \"ipip\"\n  [[vip.backend]]\n  address = \"{be}\"\n\
         \n[[snat]]\naddress = \"{vip}\"\nfirst_port = 1024\nlast_port = 65535\nrange_size = 8\n",
        vip = Fleet::VIP,
        be = Fleet::backend_address(1)
    );
    let agent = common::start_node(
        &mut lab,
        &fleet.backends[0],
        "agent",
        "agent1",
        &format!(
            "[node]\nname = \"be1\"\ninterface = \"b0\"\naddress_v4 = \"{}\"\ncontrol_socket = SOCKET\n\
             [agent]\nmuxes = [\"{}/32\"]\negress = [\"198.19.0.0/16\"]\n{vips}",
            Fleet::backend_address(1),
            Fleet::mux_address(1),
        ),
        &["--no-metrics"],
    );
    common::start_node(
        &mut lab,
        &fleet.muxes[0],
        "mux",
        "mux1",
        &format!(
            "[node]\nname = \"mux1\"\ninterface = \"m0\"\naddress_v4 = \"{}\"\nmtu = 1600\ncontrol_socket = SOCKET\n{vips}",
            Fleet::mux_address(1),
        ),
        &["--no-metrics"],
    );

    let listening = std::sync::mpsc::channel::<()>();
    let sink = internet.enter(move || -> Result<(SocketAddr, u64), String> {
        let listener = TcpListener::bind(SocketAddrV4::new(Fleet::INTERNET, SINK))
            .map_err(|e| format!("bind: {e}"))?;
        listening.0.send(()).map_err(|e| e.to_string())?;
        let (mut conn, peer) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let total = read_checked(&mut conn)?;
        Ok((peer, total))
    });
    listening
        .1
        .recv_timeout(Duration::from_secs(5))
        .expect("sink listening");
    let upload = fleet.backends[0].enter(move || -> Result<(), String> {
        let to = SocketAddr::from(SocketAddrV4::new(Fleet::INTERNET, SINK));
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        conn.set_write_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let mut stream = Stream::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut sent = 0u64;
        while sent < UPLOAD {
            let n = (UPLOAD - sent).min(buf.len() as u64) as usize;
            stream.fill(&mut buf[..n]);
            conn.write_all(&buf[..n])
                .map_err(|e| format!("write at {sent}: {e}"))?;
            sent += n as u64;
        }
        Ok(())
    });
    let uploaded = upload.join().expect("upload thread");
    let received = sink.join().expect("sink thread");
    let s = status(&agent.socket);
    assert_eq!(uploaded, Ok(()), "upload: {s}");
    let (peer, total) = received.unwrap_or_else(|e| panic!("sink: {e}\nagent: {s}"));
    assert_eq!(total, UPLOAD, "every byte, in order");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(Fleet::VIP), "from the VIP");

    std::thread::sleep(Duration::from_millis(1200));
    let c = status(&agent.socket)["counters"].clone();
    eprintln!(
        "agent: {} GSO reads, {} segments sent, {} failed",
        c["tun_gso_reads"], c["snat_outbound"], c["snat_outbound_failed"]
    );
    assert!(c["tun_gso_reads"].as_u64().unwrap() > 0, "GSO reads: {c}");
    assert!(
        c["snat_outbound"].as_u64().unwrap() >= UPLOAD / 1500,
        "wire segments sent: {c}"
    );
    assert_eq!(c["snat_outbound_failed"], 0, "{c}");
}

/// Reads `conn` to its end (a 30 s read time-out bounds each read), checking every byte against
/// [`Stream`]; the bytes read, or where they first differ.
fn read_checked(conn: &mut TcpStream) -> Result<u64, String> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut expected = Stream::new();
    let (mut got, mut want) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    let mut total = 0u64;
    loop {
        let n = conn
            .read(&mut got)
            .map_err(|e| format!("read at {total}: {e}"))?;
        if n == 0 {
            return Ok(total);
        }
        expected.fill(&mut want[..n]);
        if got[..n] != want[..n] {
            return Err(format!("bytes {total}..{} differ", total + n as u64));
        }
        total += n as u64;
    }
}
