//! Fuzzes the whole forwarding decision against a fixed snapshot (with SNAT return traffic and
//! an open daisy-chaining window): no input may panic, an
//! emitted packet fits the buffer, the must-stay-0 counter stays 0, and `process_batch` on the
//! frame three times gives what three calls of `process` give.
//! The first byte selects the link type (bit 0 clear: bare IP, set: Ethernet) and, with bit 1
//! set, has the IPv4 header checksum of the frame rewritten first, so that mutations of the
//! header still reach the layers behind the checksum check.
#![no_main]

use std::sync::OnceLock;

use lb_core::config::Config;
use lb_core::conntrack::{ConnTable, ConnTableConfig};
use lb_core::forward::{Action, DropReason, WorkerState, process, process_batch};
use lb_core::packet::Link;
use lb_core::snapshot::Snapshot;
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"
    [node]
    address_v4 = "198.18.11.2"
    address_v6 = "2001:db8:11::2"
    mtu = 1500
    [[vip]]
    name = "web"
    address = "198.18.100.1"
    protocol = "tcp"
    port = 80
    encap = "ipip"
    [[vip.backend]]
    address = "198.18.21.2"
    [[vip.backend]]
    address = "2001:db8:21::2"
    [[vip]]
    name = "udp"
    address = "198.18.100.1"
    protocol = "udp"
    port = "all"
    encap = "gre"
    [[vip.backend]]
    address = "198.18.22.2"
    [[vip]]
    name = "web6"
    address = "2001:db8:100::1"
    protocol = "tcp"
    port = 80
    encap = "gre"
    [[vip.backend]]
    address = "2001:db8:21::2"
    [[vip.backend]]
    address = "198.18.23.2"
    [[snat]]
    address = "2001:db8:100::1"
    first_port = 1024
"#;

/// The snapshot under test: SNAT return traffic on the IPv6 VIP's address, and an open
/// daisy-chaining window on its GRE VIP (a backend was just added), so both paths are fuzzed.
fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let config = Config::from_toml(CONFIG, "fuzz").expect("valid");
        let mut before = config.clone();
        before.vips[2].backends.pop();
        let old = Snapshot::compile(&before, 1).expect("builds");
        let mut snapshot = Snapshot::compile(&config, 2).expect("builds");
        snapshot.chain_from(&old, u64::MAX);
        snapshot
    })
}

/// Rewrites the checksum of the IPv4 header at `at`, if there is a whole one there.
fn fix_ipv4_checksum(frame: &mut [u8], at: usize) {
    let Some(&first) = frame.get(at) else { return };
    let header_len = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header_len < 20 || frame.len() < at + header_len {
        return;
    }
    let header = &mut frame[at..at + header_len];
    header[10..12].fill(0);
    let mut sum: u32 = header.chunks_exact(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    header[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, frame)) = data.split_first() else { return };
    let link = if selector & 1 == 0 { Link::Ip } else { Link::Ethernet };
    let mut fixed = frame.to_vec();
    if selector & 2 != 0 {
        // The IPv4 header right after Ethernet (no VLAN tag) or at the start.
        fix_ipv4_checksum(&mut fixed, if link == Link::Ip { 0 } else { 14 });
    }
    let frame = fixed.as_slice();
    let new_state = || WorkerState::new(ConnTable::new(ConnTableConfig { capacity: 64, ..ConnTableConfig::default() }));
    let mut state = new_state();
    let mut out = vec![0u8; 65535 + 48];
    for now in [0, 1_000_000_000] {
        let action = process(frame, link, snapshot(), &mut state, now, &mut out);
        if !matches!(action, Action::Pass | Action::Drop(_)) {
            assert!(action.output_len() <= out.len() && action.output_len() > 0);
        }
    }
    assert_eq!(state.counters.dropped(DropReason::Internal), 0, "{frame:02x?}");

    // Batch and one by one agree, actions and packets, on the frame three times (a flow's
    // first packet changes what its next ones find).
    let mut single = new_state();
    let mut one_by_one = Vec::new();
    for _ in 0..3 {
        let action = process(frame, link, snapshot(), &mut single, 0, &mut out);
        let len = action.output_len();
        one_by_one.push((action, out[..len].to_vec()));
    }
    let mut batch = new_state();
    let mut bufs = vec![vec![0u8; 65535 + 48]; 3];
    let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
    let mut actions = [Action::Pass; 3];
    assert_eq!(process_batch(&[frame; 3], link, snapshot(), &mut batch, 0, &mut outs, &mut actions), 3);
    for (i, (action, packet)) in one_by_one.iter().enumerate() {
        assert_eq!(actions[i], *action, "{frame:02x?}");
        assert_eq!(&outs[i][..packet.len()], packet.as_slice(), "{frame:02x?}");
    }
    assert_eq!(batch.counters, single.counters);
});
