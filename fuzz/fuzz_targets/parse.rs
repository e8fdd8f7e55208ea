//! Fuzzes the packet parser: no input may panic, and a parsed IP packet lies inside the frame.
#![no_main]

use lb_core::packet::{Link, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for link in [Link::Ip, Link::Ethernet] {
        if let Ok(p) = parse(data, link) {
            assert!(p.ip_offset + p.ip.len() <= data.len());
        }
    }
});
