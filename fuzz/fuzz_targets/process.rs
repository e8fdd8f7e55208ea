//! Fuzzes the whole forwarding decision against a fixed snapshot: no input may panic, an
//! emitted packet fits the buffer, and the must-stay-0 counter stays 0.
//! The first byte selects the link type (even: bare IP, odd: Ethernet).
#![no_main]

use std::sync::OnceLock;

use lb_core::config::Config;
use lb_core::conntrack::{ConnTable, ConnTableConfig};
use lb_core::forward::{Action, DropReason, WorkerState, process};
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
"#;

fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| Snapshot::compile(&Config::from_toml(CONFIG, "fuzz").expect("valid"), 1).expect("builds"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, frame)) = data.split_first() else { return };
    let link = if selector & 1 == 0 { Link::Ip } else { Link::Ethernet };
    let mut state = WorkerState::new(ConnTable::new(ConnTableConfig { capacity: 64, ..ConnTableConfig::default() }));
    let mut out = vec![0u8; 65535 + 48];
    for now in [0, 1_000_000_000] {
        match process(frame, link, snapshot(), &mut state, now, &mut out) {
            Action::Encap { len, .. } | Action::IcmpReply { len } => assert!(len <= out.len() && len > 0),
            Action::Pass | Action::Drop(_) => {}
        }
    }
    assert_eq!(state.counters.dropped(DropReason::Internal), 0, "{frame:02x?}");
});
