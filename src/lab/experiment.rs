//! The resilience experiments (`lb lab experiment NAME`, and the namespace tests that run them):
//! each runs long-lived TCP connections and a sequenced UDP stream from the client through a
//! [`LiveLab`], does one thing to the fleet, and measures what it cost: connections broken and
//! kept, UDP datagrams lost, time to converge.
//!
//! Invariant: an experiment leaves the lab serving (a killed server is started again, a drained
//! backend undrained; a mux killed by `mux-dies` stays out until `mux-added` brings it back),
//! so experiments can run one after another on one lab; its
//! [`Outcome::passed`] is the property the issue names, computed from the measured counts
//! only.

use std::fmt::Write as _;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::thread;
use std::time::{Duration, Instant};

use crate::lab::live::{CHECK_FALL, CHECK_INTERVAL_MS, ECHO_PORT, INTERNET, LiveLab, WEB_PORT};
use crate::lab::server::WHOAMI_PATH;
use crate::lab::traffic::{TcpLoad, TcpStats, UdpStats, UdpStream, http_get};
use crate::topology::Fleet;

/// Every experiment, in the order the demo runs them.
pub const ALL: [&str; 7] = [
    "mux-dies",
    "mux-added",
    "backend-added",
    "backend-drained",
    "backend-dies",
    "reloads",
    "snat-egress",
];

/// Long-lived TCP connections per experiment.
pub const CONNECTIONS: usize = 240;
/// Each connection sends a request this often.
const REQUEST_INTERVAL: Duration = Duration::from_millis(250);
/// The UDP stream's rate, datagrams per second, over this many flows.
const UDP_RATE: u32 = 400;
const UDP_FLOWS: u16 = 32;
/// No traffic runs longer than this, whatever happens to the caller.
const TRAFFIC_MAX: Duration = Duration::from_secs(120);
/// Traffic keeps running this long after the fleet converged.
const AFTER: Duration = Duration::from_secs(2);

/// What one experiment measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Outcome {
    /// The experiment.
    pub name: String,
    /// What was done.
    pub action: String,
    /// TCP connections established before the action.
    pub connections: usize,
    /// Of those, broken by the end.
    pub broken: usize,
    /// Of those, still answering at the end.
    pub kept: usize,
    /// UDP datagrams sent and lost (after a drain).
    pub udp_sent: u64,
    /// Lost datagrams.
    pub udp_lost: u64,
    /// From the action until the fleet converged (route, tables, health).
    pub converge_ms: Option<u64>,
    /// The property checked, and whether it held.
    pub property: String,
    /// Whether it held.
    pub passed: bool,
    /// Extra figures.
    pub notes: String,
}

impl Outcome {
    /// One line for a terminal.
    #[must_use]
    pub fn line(&self) -> String {
        format!(
            "{:<16} {:<4} connections {:>3} broken {:>3} kept {:>3}  udp lost {:>4}/{:<6} time {:>8}  {}{}",
            self.name,
            if self.passed { "PASS" } else { "FAIL" },
            self.connections,
            self.broken,
            self.kept,
            self.udp_lost,
            self.udp_sent,
            self.converge_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms")),
            self.property,
            if self.notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.notes)
            }
        )
    }
}

/// Traffic from the client: TCP connections and a UDP stream, started inside its namespace.
struct Traffic {
    tcp: TcpLoad,
    udp: UdpStream,
}

fn start_traffic(live: &LiveLab, connections: usize) -> io::Result<Traffic> {
    let web = SocketAddr::V4(SocketAddrV4::new(Fleet::VIP, WEB_PORT));
    let echo = SocketAddr::V4(SocketAddrV4::new(Fleet::VIP, ECHO_PORT));
    let traffic = live
        .fleet
        .client
        .enter(move || -> io::Result<Traffic> {
            Ok(Traffic {
                tcp: TcpLoad::start(web, connections, REQUEST_INTERVAL)?,
                udp: UdpStream::start(echo, UDP_RATE, UDP_FLOWS, TRAFFIC_MAX)?,
            })
        })
        .join()
        .map_err(|_| io::Error::other("the traffic thread panicked"))??;
    // Established and answering on every connection before anything happens.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = traffic.tcp.snapshot();
        if s.opened + s.failed_to_open >= connections && s.requests_ok >= 2 * s.opened as u64 {
            if s.failed_to_open > 0 || s.broken > 0 {
                return Err(io::Error::other(format!(
                    "the lab does not serve before the experiment: {s:?}"
                )));
            }
            return Ok(traffic);
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "connections did not all open: {s:?}\n{}",
                live.summary()
            )));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn finish(traffic: Traffic) -> (TcpStats, UdpStats) {
    thread::sleep(AFTER);
    let tcp = traffic.tcp.stop();
    let udp = traffic.udp.stop(Duration::from_secs(1));
    (tcp, udp)
}

/// Waits until `done()`; the time it took, or `None` after `timeout`.
fn converge(timeout: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if done() {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The connections of `stats` that are on backend `name` now.
fn on_backend(stats: &TcpStats, name: &str) -> usize {
    stats.per_backend.get(name).copied().unwrap_or(0)
}

fn outcome(name: &str, action: String, tcp: &TcpStats, udp: &UdpStats) -> Outcome {
    if tcp.broken + tcp.switched > 0 {
        tracing::info!(experiment = name, errors = ?tcp.errors, per_backend = ?tcp.per_backend, "broken connections");
    }
    Outcome {
        name: name.to_owned(),
        action,
        connections: tcp.opened,
        broken: tcp.broken + tcp.switched,
        kept: tcp.opened.saturating_sub(tcp.broken + tcp.switched),
        udp_sent: udp.sent,
        udp_lost: udp.lost,
        ..Outcome::default()
    }
}

/// Runs experiment `name` on `live`.
pub fn run(live: &mut LiveLab, name: &str) -> io::Result<Outcome> {
    match name {
        "mux-dies" => mux_dies(live),
        "mux-added" => mux_added(live),
        "backend-added" => backend_added(live),
        "backend-drained" => backend_drained(live),
        "backend-dies" => backend_dies(live),
        "reloads" => reloads(live),
        "snat-egress" => snat_egress(live),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no experiment {name:?}; there are: {}", ALL.join(", ")),
        )),
    }
}

/// The highest-numbered active mux.
fn last_mux(live: &LiveLab) -> io::Result<usize> {
    live.active_muxes()
        .last()
        .copied()
        .filter(|_| live.active_muxes().len() > 1)
        .ok_or_else(|| io::Error::other("the experiment needs at least two active muxes"))
}

fn mux_dies(live: &mut LiveLab) -> io::Result<Outcome> {
    let victim = last_mux(live)?;
    let traffic = start_traffic(live, CONNECTIONS)?;
    let t = Instant::now();
    live.kill_mux(victim)?;
    let took = converge(Duration::from_secs(2), || {
        let hops = crate::bird_lab::vip_nexthops(&live.fleet.router).unwrap_or_default();
        !hops.contains(&Fleet::mux_address(victim))
    })
    .map(|_| t.elapsed());
    let (tcp, udp) = finish(traffic);
    let mut o = outcome(
        "mux-dies",
        format!(
            "lb mux on mux{victim} killed (SIGKILL); the route loses it ({})",
            if live.plan.routing == crate::lab::live::Routing::Bgp {
                "its sidecar withdraws"
            } else {
                "300 ms later, as BFD would"
            }
        ),
        &tcp,
        &udp,
    );
    o.converge_ms = took.map(|d| d.as_millis() as u64);
    o.property = "0 established connections broken; the route loses the mux within 2 s".into();
    o.passed = o.broken == 0 && o.connections >= CONNECTIONS && took.is_some();
    Ok(o)
}

fn mux_added(live: &mut LiveLab) -> io::Result<Outcome> {
    let total = live.plan.muxes + live.plan.spare_muxes;
    let newcomer = (1..=total)
        .find(|i| !live.active_muxes().contains(i))
        .ok_or_else(|| io::Error::other("no mux left to add (every mux is active)"))?;
    let traffic = start_traffic(live, CONNECTIONS)?;
    let t = Instant::now();
    live.add_mux(newcomer)?;
    let took = converge(Duration::from_secs(15), || {
        let hops = crate::bird_lab::vip_nexthops(&live.fleet.router).unwrap_or_default();
        hops.contains(&Fleet::mux_address(newcomer)) && live.fingerprints_agree()
    })
    .map(|_| t.elapsed());
    let (tcp, udp) = finish(traffic);
    let mut o = outcome(
        "mux-added",
        format!("mux{newcomer} started and added to the route"),
        &tcp,
        &udp,
    );
    o.converge_ms = took.map(|d| d.as_millis() as u64);
    o.property = "0 established connections broken".into();
    o.passed = o.broken == 0 && o.connections >= CONNECTIONS;
    Ok(o)
}

fn backend_added(live: &mut LiveLab) -> io::Result<Outcome> {
    let total = live.plan.backends + live.plan.spare_backends;
    let newcomer = (1..=total)
        .find(|j| !live.active_backends().contains(j))
        .ok_or_else(|| io::Error::other("no spare backend left to add"))?;
    let victim = last_mux(live)?;
    let traffic = start_traffic(live, CONNECTIONS)?;
    let t = Instant::now();
    live.add_backend(newcomer)?;
    let added = t.elapsed();
    // The hard case: flows the new table moved now also change mux, so the mux they reach
    // has no connection state for them (conntrack cannot help; daisy chaining must).
    live.kill_mux(victim)?;
    let (tcp, udp) = finish(traffic);
    let mut o = outcome(
        "backend-added",
        format!("be{newcomer} added to every VIP (reload of every node), then mux{victim} killed"),
        &tcp,
        &udp,
    );
    o.converge_ms = Some(added.as_millis() as u64);
    o.property = "0 established connections broken (conntrack + daisy chaining)".into();
    o.passed = o.broken == 0 && o.connections >= CONNECTIONS;
    o.notes = format!("chaining {}", if live.plan.chaining { "on" } else { "off" });
    live.add_mux(victim)?;
    Ok(o)
}

fn backend_drained(live: &mut LiveLab) -> io::Result<Outcome> {
    let target = *live
        .active_backends()
        .first()
        .ok_or_else(|| io::Error::other("no backend"))?;
    let name = format!("be{target}");
    let traffic = start_traffic(live, CONNECTIONS)?;
    let on_target = on_backend(&traffic.tcp.snapshot(), &name);
    let t = Instant::now();
    live.drain(target)?;
    let took = t.elapsed();
    // New connections after the drain: none may reach the drained backend.
    let fresh = start_traffic(live, 60)?;
    let fresh_stats = fresh.tcp.stop();
    let _ = fresh.udp.stop(Duration::ZERO);
    let (tcp, udp) = finish(traffic);
    live.undrain(target)?;
    let new_on_target = on_backend(&fresh_stats, &name);
    let mut o = outcome(
        "backend-drained",
        format!("{name} drained on every mux (weight 0)"),
        &tcp,
        &udp,
    );
    o.converge_ms = Some(took.as_millis() as u64);
    o.property = format!(
        "0 broken, 0 of {} new connections on {name}",
        fresh_stats.opened
    );
    o.passed = o.broken == 0 && new_on_target == 0 && on_target > 0 && fresh_stats.opened == 60;
    o.notes = format!(
        "{on_target} connections stayed on {name}; new ones by backend {:?}",
        fresh_stats.per_backend
    );
    Ok(o)
}

fn backend_dies(live: &mut LiveLab) -> io::Result<Outcome> {
    let target = *live
        .active_backends()
        .last()
        .ok_or_else(|| io::Error::other("no backend"))?;
    let name = format!("be{target}");
    let traffic = start_traffic(live, CONNECTIONS)?;
    let on_target = on_backend(&traffic.tcp.snapshot(), &name);
    let t = Instant::now();
    live.signal(&format!("server{target}"), libc::SIGKILL)?;
    let bound = Duration::from_millis(u64::from(CHECK_INTERVAL_MS * CHECK_FALL) + 1000);
    let took = converge(bound + Duration::from_secs(5), || {
        live.backend_in_tables(target, false)
    })
    .map(|_| t.elapsed());
    let (tcp, udp) = finish(traffic);
    live.start_server(target)?;
    let mut o = outcome(
        "backend-dies",
        format!("{name}'s server killed (SIGKILL)"),
        &tcp,
        &udp,
    );
    o.converge_ms = took.map(|d| d.as_millis() as u64);
    o.property = format!(
        "only {name}'s {on_target} connections broken; out of every table within {} ms",
        bound.as_millis()
    );
    o.passed = o.broken == on_target && on_target > 0 && took.is_some_and(|d| d <= bound);
    // The restarted server comes back into the tables after rise.
    let back = converge(Duration::from_secs(10), || {
        live.backend_in_tables(target, true)
    });
    o.notes = format!(
        "back in every table {} after restart",
        back.map_or_else(|| "not yet".to_owned(), |d| format!("{} ms", d.as_millis()))
    );
    Ok(o)
}

/// Config reloads in a row under load.
pub const RELOADS: usize = 100;

fn reloads(live: &mut LiveLab) -> io::Result<Outcome> {
    let traffic = start_traffic(live, CONNECTIONS)?;
    let t = Instant::now();
    let changed = *live
        .active_backends()
        .first()
        .ok_or_else(|| io::Error::other("no backend"))?;
    let mut generations = 0;
    for round in 0..RELOADS {
        // Every reload publishes a different table: one backend's weight alternates 2 and 1.
        live.set_weight(changed, if round % 2 == 0 { 2 } else { 1 })?;
        generations += live.on_every_mux(&serde_json::json!({"command": "reload"}))?;
        thread::sleep(Duration::from_millis(20));
    }
    let took = t.elapsed();
    let (tcp, udp) = finish(traffic);
    let mut o = outcome(
        "reloads",
        format!(
            "{RELOADS} config reloads on every mux under load, be{changed}'s weight alternating 2 and 1"
        ),
        &tcp,
        &udp,
    );
    o.converge_ms = Some(took.as_millis() as u64);
    o.property = "0 UDP datagrams lost, 0 connections broken".into();
    o.passed = o.udp_lost == 0 && o.broken == 0 && udp.sent > 0;
    o.notes = format!("{generations} reloads answered");
    Ok(o)
}

fn snat_egress(live: &mut LiveLab) -> io::Result<Outcome> {
    let backends: Vec<usize> = live.active_backends().to_vec();
    let per_backend = 8;
    let target = SocketAddr::V4(SocketAddrV4::new(INTERNET, WEB_PORT));
    let t = Instant::now();
    let handles: Vec<_> = backends
        .iter()
        .map(|&j| {
            live.fleet.backend(j).enter(move || {
                let workers: Vec<_> = (0..per_backend)
                    .map(|_| {
                        thread::spawn(move || {
                            http_get(target, WHOAMI_PATH).map_err(|e| e.to_string())
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().unwrap_or_else(|_| Err("panicked".into())))
                    .collect::<Vec<Result<String, String>>>()
            })
        })
        .collect();
    let mut ok = 0;
    let mut wrong = Vec::new();
    let mut failed = Vec::new();
    for (h, &j) in handles.into_iter().zip(&backends) {
        for r in h.join().unwrap_or_default() {
            match r {
                Ok(seen) if seen.starts_with(&format!("{}:", Fleet::VIP)) => ok += 1,
                Ok(seen) => wrong.push(format!("be{j} seen as {seen}")),
                Err(e) => failed.push(format!("be{j}: {e}")),
            }
        }
    }
    let total = backends.len() * per_backend;
    let mut notes = String::new();
    if !wrong.is_empty() || !failed.is_empty() {
        let _ = write!(notes, "{wrong:?} {failed:?}");
    }
    Ok(Outcome {
        name: "snat-egress".into(),
        action: format!(
            "every backend opens {per_backend} connections to the internet host at once"
        ),
        connections: total,
        broken: total - ok,
        kept: ok,
        converge_ms: Some(t.elapsed().as_millis() as u64),
        property: "every connection succeeds, seen with the VIP as source".into(),
        passed: ok == total,
        notes,
        ..Outcome::default()
    })
}

/// The results table (Markdown) of `outcomes`.
#[must_use]
pub fn results_table(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "| experiment | what was done | property | result | connections | broken | kept | UDP lost / sent | time |\n| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for o in outcomes {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |",
            o.name,
            o.action,
            o.property,
            if o.passed { "pass" } else { "**FAIL**" },
            o.connections,
            o.broken,
            o.kept,
            o.udp_lost,
            o.udp_sent,
            o.converge_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms"))
        );
    }
    s
}

/// The control run: `backend-added` on a lab with daisy chaining off must break connections,
/// or the experiment could not tell a working fleet from a broken one.
#[must_use]
pub fn as_control(mut o: Outcome) -> Outcome {
    o.name = "backend-added, chaining off (control)".into();
    o.property = "connections break without daisy chaining (the experiment can fail)".into();
    o.passed = o.broken > 0;
    o
}

/// What the time column means, per experiment.
fn time_meaning(name: &str) -> &'static str {
    match name {
        "mux-dies" => "from the kill until the router's route no longer has the mux",
        "mux-added" => "until the route has the new mux and every mux's tables agree",
        "backend-added" | "backend-added, chaining off (control)" => {
            "until every mux serves the new table (reload of every node)"
        }
        "backend-drained" => "until every mux has published the drain",
        "backend-dies" => "until the backend is out of every mux's table (health checks)",
        "reloads" => "the 100 rounds of reloads (each a new table)",
        "snat-egress" => "until every connection was answered",
        _ => "",
    }
}

/// RESULTS.md: the table, how it was made, and what each experiment does.
#[must_use]
pub fn results_document(outcomes: &[Outcome], command: &str) -> String {
    let mut s = String::from("# Resilience experiments: measured results\n\n");
    let _ = writeln!(
        s,
        "Regenerate with (as root, from the repository):\n\n```\ncargo build --release && sudo ./target/release/lb lab experiment all --results RESULTS.md\n```\n\nThis file was written by `{command}`. Each experiment runs {CONNECTIONS} long-lived TCP connections (a request on each every {} ms) and a sequenced UDP stream ({UDP_RATE} datagrams/s over {UDP_FLOWS} flows) from the client through the lab's router and muxes (`lb lab up` builds the same lab), does one thing to the fleet, and counts what broke. Health checks: interval {CHECK_INTERVAL_MS} ms, fall {CHECK_FALL}. Figures are from one run on a shared 2-core machine.\n",
        REQUEST_INTERVAL.as_millis()
    );
    s.push_str(&results_table(outcomes));
    s.push_str("\nPer experiment, what the time column measures, and more figures:\n\n");
    for o in outcomes {
        let _ = writeln!(
            s,
            "- **{}**: time = {}.{}",
            o.name,
            time_meaning(&o.name),
            if o.notes.is_empty() {
                String::new()
            } else {
                format!(" {}.", o.notes)
            }
        );
    }
    s
}
