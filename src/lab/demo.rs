//! `lb lab demo` and `lb lab experiment`: a temporary lab, live traffic shown per mux and per
//! backend, the experiments one by one, and the results table; the lab is removed at the end
//! (also on an error or a panic: it is an RAII [`Lab`]; and on SIGINT, SIGTERM or SIGHUP once
//! the command has called [`crate::netns::remove_labs_on_signal`], as `lb lab demo` and `lb lab
//! experiment` do).
//!
//! Invariant: everything the demo builds lives in `lbt-demo-*` namespaces that its [`Lab`]
//! removes; traffic is bounded in time (see [`crate::lab::traffic`]).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::thread;
use std::time::{Duration, Instant};

use crate::lab::experiment::{self, Outcome};
use crate::lab::live::{ECHO_PORT, LabPlan, LiveLab, WEB_PORT};
use crate::lab::traffic::{TcpLoad, UdpStream};
use crate::netns::Lab;
use crate::topology::Fleet;

/// Connections of the live view.
const VIEW_CONNECTIONS: usize = 200;

/// Brings a temporary lab up with `plan`, shows `view_seconds` of live traffic, runs
/// `experiments` (names from [`experiment::ALL`]) and returns their outcomes; progress goes to
/// `out`. The lab is removed before this returns.
pub fn run(
    plan: LabPlan,
    view_seconds: u64,
    experiments: &[&str],
    out: &mut dyn Write,
) -> io::Result<Vec<Outcome>> {
    writeln!(
        out,
        "== bringing the lab up: {} muxes, {} backends, routing {:?}",
        plan.muxes, plan.backends, plan.routing
    )?;
    let started = Instant::now();
    let lab = Lab::new("demo")?;
    let mut live = LiveLab::up(lab, plan)?;
    writeln!(
        out,
        "up in {:.1} s\n{}",
        started.elapsed().as_secs_f64(),
        live.summary()
    )?;
    if view_seconds > 0 {
        live_view(&live, view_seconds, out)?;
    }
    let mut outcomes = Vec::new();
    for name in experiments {
        writeln!(out, "== experiment {name}")?;
        out.flush()?;
        let o = experiment::run(&mut live, name)?;
        writeln!(out, "{}", o.line())?;
        outcomes.push(o);
    }
    writeln!(out, "== tearing the lab down")?;
    drop(live);
    Ok(outcomes)
}

/// Cumulative frames per mux (`muxI`) and packets per backend (`backend NAME`), summed over
/// the active muxes.
fn counters(live: &LiveLab) -> BTreeMap<String, u64> {
    let mut into = BTreeMap::new();
    for &i in live.active_muxes() {
        let s = live.mux_status(i);
        into.insert(
            format!("mux{i}"),
            s["counters"]["frames"].as_u64().unwrap_or(0),
        );
        for vip in s["vips"].as_array().into_iter().flatten() {
            for b in vip["backends"].as_array().into_iter().flatten() {
                let name = format!("backend {}", b["name"].as_str().unwrap_or("?"));
                *into.entry(name).or_default() += b["packets"].as_u64().unwrap_or(0);
            }
        }
    }
    into
}

/// Per-mux frames and per-backend packets, each second, while traffic runs.
fn live_view(live: &LiveLab, seconds: u64, out: &mut dyn Write) -> io::Result<()> {
    let web = SocketAddr::V4(SocketAddrV4::new(Fleet::VIP, WEB_PORT));
    let echo = SocketAddr::V4(SocketAddrV4::new(Fleet::VIP, ECHO_PORT));
    let (tcp, udp) = live
        .fleet
        .client
        .enter(move || -> io::Result<(TcpLoad, UdpStream)> {
            Ok((
                TcpLoad::start(web, VIEW_CONNECTIONS, Duration::from_millis(100))?,
                UdpStream::start(echo, 500, 32, Duration::from_secs(seconds + 10))?,
            ))
        })
        .join()
        .map_err(|_| io::Error::other("the traffic thread panicked"))??;
    writeln!(
        out,
        "== live traffic: {VIEW_CONNECTIONS} TCP connections (a request each every 100 ms) and 500 UDP datagrams/s"
    )?;
    let mut last = counters(live);
    for second in 1..=seconds {
        thread::sleep(Duration::from_secs(1));
        let now = counters(live);
        let rate = |key: &str| {
            let value = now.get(key).copied().unwrap_or(0);
            value.saturating_sub(last.get(key).copied().unwrap_or(value))
        };
        let muxes: Vec<String> = now
            .keys()
            .filter(|k| k.starts_with("mux"))
            .map(|k| format!("{k} {:>5}/s", rate(k)))
            .collect();
        let per_backend: Vec<String> = now
            .keys()
            .filter_map(|k| k.strip_prefix("backend ").map(|name| (k, name)))
            .map(|(k, name)| format!("{name} {:>5}/s", rate(k)))
            .collect();
        last = now;
        let t = tcp.snapshot();
        writeln!(
            out,
            "{second:>3}s  muxes: {}  |  backends: {}  |  tcp open {} broken {}",
            muxes.join("  "),
            per_backend.join("  "),
            t.open_now,
            t.broken
        )?;
        out.flush()?;
    }
    let t = tcp.stop();
    let u = udp.stop(Duration::from_millis(500));
    writeln!(
        out,
        "connections per backend {:?}; UDP sent {} lost {}",
        t.per_backend, u.sent, u.lost
    )?;
    Ok(())
}
