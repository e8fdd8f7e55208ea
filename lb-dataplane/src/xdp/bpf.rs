//! The XDP program that steers VIP frames into the AF_XDP sockets, and the few `bpf(2)` calls
//! that load and attach it: no BPF toolchain, no object file, no libbpf.
//!
//! The program is 45 instructions emitted here ([`steering_program`]):
//! 1. a frame shorter than Ethernet + IPv4 header, or neither IPv4 nor IPv6 (ARP, VLAN-tagged,
//!    LLDP, ...), is passed to the kernel (`XDP_PASS`);
//! 2. its destination address (IPv4 as IPv4-mapped IPv6, so one 16-byte key serves both) is
//!    looked up in the VIP map ([`VipMap`], a BPF hash map the node keeps equal to the
//!    published snapshot's addresses);
//! 3. a frame to a steered address is redirected into the XSKMAP slot of its receive queue
//!    (for an address of kind [`KIND_TUNNELS`], an agent's, only IP-in-IP, IPv6-in-IP and GRE
//!    packets); when that slot has no socket, `bpf_redirect_map`'s fallback action passes it to
//!    the kernel.
//!
//! Every other frame (the host's own traffic: ARP, neighbour discovery, BGP, SSH, health
//! checks) reaches the kernel as if no program were attached.
//!
//! **Attachment is a BPF link** (`BPF_LINK_CREATE`): the program stays attached while the link's
//! file descriptor is open and is detached by the kernel when the last descriptor closes, so a
//! mux that exits in any way, SIGKILL included, leaves nothing attached, and its successor
//! attaches at once. A link cannot replace a program someone else attached (the call fails with
//! `EBUSY`), so another program on the interface is never removed.
//!
//! **Invariant.** Every descriptor is `O_CLOEXEC` (the kernel sets it on `bpf(2)` descriptors),
//! so no child process keeps a link, and with it the program, alive.

use std::ffi::CStr;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `bpf(2)` commands used here.
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`'s `BPF_XDP`.
const BPF_XDP: u32 = 37;

/// `XDP_FLAGS_SKB_MODE`: generic XDP, after the kernel built an skb.
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `XDP_FLAGS_DRV_MODE`: native XDP, in the driver.
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// `XDP_PASS`.
const XDP_PASS: i32 = 2;

/// An address's kind in the VIP map: every frame to it is steered (a mux's VIP).
pub const KIND_ANY: u32 = 0;
/// An address's kind in the VIP map: only tunnel packets to it (IP-in-IP, IPv6-in-IP, GRE) are
/// steered, the rest is the host's (an agent's own address).
pub const KIND_TUNNELS: u32 = 1;

/// Keys of the VIP map: an IPv6 address, IPv4 as IPv4-mapped.
const VIP_KEY: u32 = 16;
/// The most VIP addresses one node steers.
pub const MAX_VIP_ADDRESSES: u32 = 65_536;

/// Where the program runs, in the order tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native XDP, in the driver's receive path.
    Driver,
    /// Generic XDP, after the kernel allocated an skb (any driver).
    Skb,
}

impl AttachMode {
    /// The name shown in status and metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Driver => "driver",
            Self::Skb => "skb",
        }
    }

    fn flags(self) -> u32 {
        match self {
            Self::Driver => XDP_FLAGS_DRV_MODE,
            Self::Skb => XDP_FLAGS_SKB_MODE,
        }
    }
}

/// Calls `bpf(cmd, attr, size_of(attr))`; a descriptor or 0 on success.
fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised `repr(C)` attribute block of the size passed,
    // laid out as the kernel's `union bpf_attr` member for `cmd`; the kernel reads (and for some
    // commands writes) only within that size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: `fd` was just returned by `bpf(2)` as a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 4],
}

fn name16(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(name.bytes().take(15)) {
        *o = b;
    }
    out
}

fn create_map(kind: u32, key: u32, value: u32, entries: u32, name: &str) -> io::Result<OwnedFd> {
    let mut attr = MapCreate {
        map_type: kind,
        key_size: key,
        value_size: value,
        max_entries: entries,
        map_name: name16(name),
        ..MapCreate::default()
    };
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

fn update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value_or_next_key: value.as_ptr() as u64,
        ..MapElem::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

fn delete(map: &OwnedFd, key: &[u8]) -> io::Result<()> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        ..MapElem::default()
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
}

/// The VIP map's key of `address`: IPv6, or IPv4 as IPv4-mapped IPv6.
#[must_use]
pub fn vip_key(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The BPF hash map of the addresses whose frames are steered into the sockets.
#[derive(Debug)]
pub struct VipMap {
    fd: OwnedFd,
}

impl VipMap {
    /// An empty map.
    pub fn create() -> io::Result<Self> {
        create_map(BPF_MAP_TYPE_HASH, VIP_KEY, 4, MAX_VIP_ADDRESSES, "lb_vips")
            .map(|fd| Self { fd })
    }

    /// The map's descriptor, for the program.
    #[must_use]
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Adds `addresses` as `kind` ([`KIND_ANY`] or [`KIND_TUNNELS`]); present ones are
    /// updated.
    pub fn add(&self, addresses: &[IpAddr], kind: u32) -> io::Result<()> {
        for &a in addresses {
            update(&self.fd, &vip_key(a), &kind.to_ne_bytes())?;
        }
        Ok(())
    }

    /// Removes every key not in `keep`.
    pub fn retain(&self, keep: &[IpAddr]) -> io::Result<()> {
        let keep: Vec<[u8; 16]> = keep.iter().map(|&a| vip_key(a)).collect();
        for key in self.keys()? {
            if !keep.contains(&key) {
                delete(&self.fd, &key)?;
            }
        }
        Ok(())
    }

    /// The keys in the map.
    pub fn keys(&self) -> io::Result<Vec<[u8; 16]>> {
        let mut keys = Vec::new();
        let mut next = [0u8; 16];
        let mut current: Option<[u8; 16]> = None;
        loop {
            let mut attr = MapElem {
                map_fd: self.fd.as_raw_fd() as u32,
                key: current.as_ref().map_or(0, |k| k.as_ptr() as u64),
                value_or_next_key: next.as_mut_ptr() as u64,
                ..MapElem::default()
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => {
                    keys.push(next);
                    current = Some(next);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(e) => return Err(e),
            }
        }
    }
}

/// The BPF map from receive queue to AF_XDP socket.
#[derive(Debug)]
pub struct XskMap {
    fd: OwnedFd,
}

impl XskMap {
    /// A map with a slot per queue, `queues` of them.
    pub fn create(queues: u32) -> io::Result<Self> {
        create_map(BPF_MAP_TYPE_XSKMAP, 4, 4, queues.max(1), "lb_xsks").map(|fd| Self { fd })
    }

    /// The map's descriptor, for the program.
    #[must_use]
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Puts the socket `socket` into the slot of `queue`.
    pub fn insert(&self, queue: u32, socket: RawFd) -> io::Result<()> {
        update(
            &self.fd,
            &queue.to_ne_bytes(),
            &(socket as u32).to_ne_bytes(),
        )
    }
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

// Opcodes (class | size/op | source).
const LDX_W: u8 = 0x61;
const LDX_H: u8 = 0x69;
const LDX_DW: u8 = 0x79;
const LDX_B: u8 = 0x71;
const STX_W: u8 = 0x63;
const STX_DW: u8 = 0x7b;
const ST_W: u8 = 0x62;
const ST_DW: u8 = 0x7a;
const MOV64_X: u8 = 0xbf;
const MOV64_K: u8 = 0xb7;
const ADD64_K: u8 = 0x07;
const JA: u8 = 0x05;
const JEQ_K: u8 = 0x15;
const JNE_K: u8 = 0x55;
const JGT_X: u8 = 0x2d;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const LD_IMM64: u8 = 0x18;
/// `BPF_PSEUDO_MAP_FD`: the 64-bit immediate is a map descriptor.
const PSEUDO_MAP_FD: u8 = 1;

const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_REDIRECT_MAP: i32 = 51;

/// `struct xdp_md` offsets.
const MD_DATA: i16 = 0;
const MD_DATA_END: i16 = 4;
const MD_RX_QUEUE_INDEX: i16 = 16;

/// The EtherTypes as a little-endian 16-bit load of the big-endian field reads them.
const ETH_P_IP_LOADED: i32 = 0x0008;
const ETH_P_IPV6_LOADED: i32 = 0xdd86;

fn ld_map_fd(dst: u8, fd: RawFd) -> [Insn; 2] {
    [
        insn(LD_IMM64, dst, PSEUDO_MAP_FD, 0, fd),
        insn(0, 0, 0, 0, 0),
    ]
}

/// The steering program (see the module docs), with the descriptors of its two maps.
#[must_use]
pub fn steering_program(vips: RawFd, xsks: RawFd) -> Vec<Insn> {
    // Registers: r6 = ctx, r7 = data (kept across the call), r9 = EtherType, r2 = data,
    // r3 = data_end, r4 = bound or protocol, r5 = scratch, r10 = frame pointer.
    let mut p = vec![
        insn(MOV64_X, 6, 1, 0, 0),                     // 0: r6 = ctx
        insn(LDX_W, 2, 6, MD_DATA, 0),                 // 1: r2 = data
        insn(LDX_W, 3, 6, MD_DATA_END, 0),             // 2: r3 = data_end
        insn(MOV64_X, 7, 2, 0, 0),                     // 3: r7 = data
        insn(MOV64_X, 4, 2, 0, 0),                     // 4: r4 = data
        insn(ADD64_K, 4, 0, 0, 14 + 20),               // 5: Ethernet + IPv4 header
        insn(JGT_X, 4, 3, 36, 0),                      // 6: short -> PASS
        insn(LDX_H, 9, 2, 12, 0),                      // 7: r9 = EtherType
        insn(JEQ_K, 9, 0, 9, ETH_P_IP_LOADED),         // 8: IPv4 -> V4
        insn(JNE_K, 9, 0, 33, ETH_P_IPV6_LOADED),      // 9: not IPv6 -> PASS
        insn(MOV64_X, 4, 2, 0, 0),                     // 10: IPv6
        insn(ADD64_K, 4, 0, 0, 14 + 40),               // 11
        insn(JGT_X, 4, 3, 30, 0),                      // 12: short -> PASS
        insn(LDX_DW, 5, 2, 14 + 24, 0),                // 13: destination
        insn(STX_DW, 10, 5, -16, 0),                   // 14
        insn(LDX_DW, 5, 2, 14 + 32, 0),                // 15
        insn(STX_DW, 10, 5, -8, 0),                    // 16
        insn(JA, 0, 0, 4, 0),                          // 17: -> LOOKUP
        insn(ST_DW, 10, 0, -16, 0),                    // 18: V4: ::ffff:a.b.c.d
        insn(ST_W, 10, 0, -8, 0xffff_0000_u32 as i32), // 19: bytes 00 00 ff ff
        insn(LDX_W, 5, 2, 14 + 16, 0),                 // 20: destination
        insn(STX_W, 10, 5, -4, 0),                     // 21
    ];
    p.extend(ld_map_fd(1, vips)); // 22, 23: LOOKUP
    p.extend([
        insn(MOV64_X, 2, 10, 0, 0),                                  // 24
        insn(ADD64_K, 2, 0, 0, -16),                                 // 25: r2 = &key
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),                 // 26
        insn(JEQ_K, 0, 0, 15, 0),                                    // 27: not steered -> PASS
        insn(LDX_W, 5, 0, 0, 0),                                     // 28: r5 = the address's kind
        insn(JEQ_K, 5, 0, 7, KIND_ANY as i32),                       // 29: any protocol -> REDIRECT
        insn(LDX_B, 4, 7, 14 + 9, 0),                                // 30: IPv4 protocol
        insn(JEQ_K, 9, 0, 1, ETH_P_IP_LOADED),                       // 31: IPv4 -> CHECK
        insn(LDX_B, 4, 7, 14 + 6, 0),                                // 32: IPv6 next header
        insn(JEQ_K, 4, 0, 3, i32::from(lb_core::encap::PROTO_IPIP)), // 33: CHECK
        insn(JEQ_K, 4, 0, 2, i32::from(lb_core::encap::PROTO_IPV6)), // 34
        insn(JEQ_K, 4, 0, 1, i32::from(lb_core::encap::PROTO_GRE)),  // 35
        insn(JA, 0, 0, 6, 0),                                        // 36: -> PASS
        insn(LDX_W, 2, 6, MD_RX_QUEUE_INDEX, 0),                     // 37: REDIRECT
    ]);
    p.extend(ld_map_fd(1, xsks)); // 38, 39
    p.extend([
        // bpf_redirect_map(xsks, rx_queue_index, XDP_PASS): no socket in the slot -> pass.
        insn(MOV64_K, 3, 0, 0, XDP_PASS),         // 40
        insn(CALL, 0, 0, 0, HELPER_REDIRECT_MAP), // 41
        insn(EXIT, 0, 0, 0, 0),                   // 42
        insn(MOV64_K, 0, 0, 0, XDP_PASS),         // 43: PASS
        insn(EXIT, 0, 0, 0, 0),                   // 44
    ]);
    p
}

/// A program that passes every frame to the kernel: what another tool's program looks like to
/// the mux (tests of "never replace someone else's program" attach it).
#[must_use]
pub fn pass_program() -> Vec<Insn> {
    vec![insn(MOV64_K, 0, 0, 0, XDP_PASS), insn(EXIT, 0, 0, 0, 0)]
}

/// The name of the loaded program, as `bpftool prog` shows it.
pub const PROGRAM_NAME: &str = "lb_steer";
const LICENSE: &CStr = c"Dual MIT/GPL";

/// Loads `program` as an XDP program; a verifier refusal comes back with the verifier's log.
pub fn load_xdp(program: &[Insn]) -> io::Result<OwnedFd> {
    let attempt = |log: Option<&mut Vec<u8>>| {
        let (level, size, buf) = match log {
            Some(l) => (1, l.len() as u32, l.as_mut_ptr() as u64),
            None => (0, 0, 0),
        };
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: program.len() as u32,
            insns: program.as_ptr() as u64,
            license: LICENSE.as_ptr() as u64,
            log_level: level,
            log_size: size,
            log_buf: buf,
            prog_name: name16(PROGRAM_NAME),
            expected_attach_type: BPF_XDP,
            ..ProgLoad::default()
        };
        bpf(BPF_PROG_LOAD, &mut attr).map(owned)
    };
    match attempt(None) {
        Ok(fd) => Ok(fd),
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EINVAL) =>
        {
            let mut log = vec![0u8; 64 * 1024];
            match attempt(Some(&mut log)) {
                Ok(fd) => Ok(fd),
                Err(again) => {
                    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                    let text = String::from_utf8_lossy(&log[..end]);
                    Err(io::Error::new(
                        again.kind(),
                        format!(
                            "the verifier refused the steering program: {again}: {}",
                            text.trim()
                        ),
                    ))
                }
            }
        }
        Err(e) => Err(e),
    }
}

/// Attaches `program` to `ifindex` as a BPF link in `mode`. The program stays attached while
/// the returned descriptor is open.
pub fn attach_link(program: &OwnedFd, ifindex: u32, mode: AttachMode) -> io::Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: program.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: mode.flags(),
        ..LinkCreate::default()
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_their_labels() {
        let p = steering_program(3, 4);
        assert_eq!(p.len(), 45);
        let target = |at: usize| (at as i64 + 1 + i64::from(p[at].off)) as usize;
        const PASS: usize = 43;
        const REDIRECT: usize = 37;
        assert_eq!((p[PASS].code, p[PASS].imm), (MOV64_K, XDP_PASS));
        assert_eq!(p[PASS + 1].code, EXIT);
        for at in [6, 9, 12, 27, 36] {
            assert_eq!(target(at), PASS, "jump at {at}");
        }
        assert_eq!(target(8), 18, "IPv4 branch");
        assert_eq!(target(17), 22, "IPv6 branch joins the lookup");
        assert_eq!(target(31), 33, "IPv4 protocol checked");
        for at in [29, 33, 34, 35] {
            assert_eq!(target(at), REDIRECT, "jump at {at}");
        }
        assert_eq!((p[22].code, p[22].imm), (LD_IMM64, 3));
        assert_eq!((p[38].code, p[38].imm), (LD_IMM64, 4));
        assert_eq!(p[41].imm, HELPER_REDIRECT_MAP);
        // Every jump stays inside the program.
        for (at, i) in p.iter().enumerate() {
            if i.code & 0x07 == 0x05 && i.code != CALL && i.code != EXIT {
                assert!(target(at) < p.len(), "jump at {at}");
            }
        }
    }

    #[test]
    fn keys_map_ipv4_into_ipv6() {
        let k = vip_key("198.18.100.1".parse().unwrap());
        assert_eq!(&k[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&k[12..], &[198, 18, 100, 1]);
        let k6 = vip_key("2001:db8::1".parse().unwrap());
        assert_eq!(k6[0], 0x20);
        assert_eq!(k6[15], 1);
    }
}
