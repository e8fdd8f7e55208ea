//! BIRD 2 in the test fleet: BGP routes the VIP instead of a static route. A BIRD on the
//! router learns the VIP from a BIRD "speaker" in each mux namespace and installs it in the
//! router's kernel as one ECMP route over the muxes that announce it.
//!
//! ```text
//!  router: BIRD AS 65000 ── session muxI ─── 198.18.1I.1 ↔ 198.18.1I.2 ─── mux I: BIRD AS 65100
//!          imports VIP /32s, kernel protocol                         session uplink, static vip4
//!          (merge paths on) → ECMP route                             (VIP/32 blackhole, exported)
//! ```
//!
//! - **Router** ([`start_router`]): one BGP session per mux, named [`router_session`]`(i)`
//!   (`mux1`, `mux2`, …). It imports only /32s inside 198.18.100.0/24 and exports nothing.
//!   Its kernel protocol exports the BGP routes to the router's main table with `merge paths
//!   on`, so equal paths from several muxes become one multipath route (always a plain
//!   multipath route: BIRD 2.0 does not use nexthop objects, so [`FleetPlan::resilient`] has
//!   no effect on it).
//! - **Speaker** ([`start_speaker`]): in mux `i`, session [`SPEAKER_SESSION`] to the router's
//!   side of the mux's link, and static protocol [`VIP_PROTOCOL`] originating
//!   [`Fleet::VIP`]/32 as a blackhole. It exports only that protocol's routes and imports
//!   nothing. There is no kernel protocol: the speaker never touches the mux's kernel tables
//!   (the mux keeps no VIP route, see [`topology`](crate::topology)).
//!   `birdc -s SOCKET disable vip4` withdraws the VIP from the router while the BGP session
//!   stays up; `enable vip4` announces it again. This is what a health-check sidecar runs.
//!
//! Sessions come up and recover fast: connect delay 1 s, connect retry 1 s, error wait
//! 1–5 s (BIRD's default waits 60 s or more after a hold-timer expiry), hold 6 s,
//! keepalive 2 s. IPv4 only: with [`FleetPlan::ipv6`], [`Fleet::VIP6`] keeps its static route.
//!
//! **Control socket.** Each BIRD's control socket is a Unix socket in the filesystem
//! ([`Bird::socket`]); network namespaces do not separate filesystem sockets, so
//! [`Bird::birdc`] runs `birdc -s SOCKET …` from the caller's own namespace, and so can any
//! process on the machine (the sidecar may equally run it inside the mux's namespace).
//!
//! Invariant: every BIRD is started with [`Lab::spawn`] inside one of the lab's namespaces, in
//! the foreground, so the pid the lab tracks is BIRD's own and the lab kills it when dropped;
//! its config, control socket and pid file live in [`Lab::log_dir`]. Only the router's BIRD
//! changes kernel routes, only in the router's namespace, and only /32s of 198.18.100.0/24.
//! Nothing is added to the root namespace. [`start_router`] first deletes the static IPv4 VIP
//! route [`Fleet::build`] installed, so the router's VIP route comes from BIRD alone.
//!
//! Needs `bird` and `birdc` (Debian package `bird2`) on `PATH`, and root (see
//! [`require_root`](crate::netns::require_root)).
//!
//! [`FleetPlan::resilient`]: crate::topology::FleetPlan::resilient
//! [`FleetPlan::ipv6`]: crate::topology::FleetPlan::ipv6

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::netns::{Lab, Namespace};
use crate::topology::Fleet;

/// Name of the static protocol in each mux speaker that originates [`Fleet::VIP`]/32.
/// Disabling it (`birdc disable vip4`) withdraws the VIP; the BGP session stays up.
pub const VIP_PROTOCOL: &str = "vip4";

/// Name of a mux speaker's BGP session to the router.
pub const SPEAKER_SESSION: &str = "uplink";

/// The router's AS number.
pub const ROUTER_AS: u32 = 65000;

/// The AS number of every mux.
pub const MUX_AS: u32 = 65100;

/// BGP timers of both sides (see the module docs).
const TIMERS: &str = "hold time 6; keepalive time 2; connect delay time 1; \
                      connect retry time 1; error wait time 1, 5;";

/// How long a starting BIRD may take to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest Unix socket path (`sun_path` holds 108 bytes, with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The name of the router's BGP session to mux `i` (1-based): `mux{i}`.
pub fn router_session(i: usize) -> String {
    format!("mux{i}")
}

/// A running BIRD started by [`start_router`] or [`start_speaker`].
#[derive(Clone, Debug)]
pub struct Bird {
    /// BIRD's own pid, as [`Lab::spawn`] returned it (use it with [`Lab::log`]).
    pub pid: u32,
    /// Its control socket (for `birdc -s`).
    pub socket: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// The namespace it runs in.
    pub ns: Namespace,
}

/// One line of `birdc show protocols`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protocol {
    /// Protocol name, e.g. `mux1`.
    pub name: String,
    /// Protocol type, e.g. `BGP`.
    pub proto: String,
    /// Table column (`---` for BGP).
    pub table: String,
    /// `up`, `down`, `start`, …
    pub state: String,
    /// When the state last changed (BIRD's time format, milliseconds): a session that
    /// flapped has a newer value.
    pub since: String,
    /// The rest, e.g. `Established` for a BGP session that is up.
    pub info: String,
}

impl Bird {
    /// Runs `birdc -s SOCKET args…` (from the caller's namespace: the socket is a filesystem
    /// socket) and returns its stdout. birdc exits non-zero when the command fails (syntax
    /// error, unknown protocol, no BIRD on the socket); the error then names the command and
    /// carries birdc's output.
    pub fn birdc(&self, args: &[&str]) -> io::Result<String> {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("`birdc`: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(io::Error::other(format!(
                "`birdc -s {} {}` (BIRD in {}) failed ({}): {}{}",
                self.socket.display(),
                args.join(" "),
                self.ns,
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// The `show protocols` line of protocol `name`.
    pub fn protocol(&self, name: &str) -> io::Result<Protocol> {
        let out = self.birdc(&["show", "protocols", name])?;
        parse_protocol(&out, name).ok_or_else(|| {
            io::Error::other(format!("no protocol {name} in BIRD in {}: {out}", self.ns))
        })
    }

    /// For failure messages: `birdc show protocols all` (or why it failed) and BIRD's log.
    pub fn diagnostics(&self, lab: &Lab) -> String {
        let protocols = self
            .birdc(&["show", "protocols", "all"])
            .unwrap_or_else(|e| e.to_string());
        format!(
            "--- BIRD in {} (pid {}): show protocols all ---\n{}\n--- its log ---\n{}",
            self.ns,
            self.pid,
            protocols.trim_end(),
            lab.log(self.pid).trim_end()
        )
    }
}

/// Starts BIRD on `fleet.router` with a BGP session to each of `muxes` (1-based indices),
/// after deleting the static IPv4 VIP route [`Fleet::build`] installed. Returns once BIRD
/// answers on its control socket; the sessions come up once the speakers run.
pub fn start_router(lab: &mut Lab, fleet: &Fleet, muxes: &[usize]) -> io::Result<Bird> {
    let mut seen = Vec::new();
    for &i in muxes {
        if i == 0 || i > fleet.plan().muxes || seen.contains(&i) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "mux {i}: not in the fleet of {}, or twice",
                    fleet.plan().muxes
                ),
            ));
        }
        seen.push(i);
    }
    let vip = format!("{}/32", Fleet::VIP);
    if !fleet
        .router
        .ip(&["-4", "route", "show", &vip])?
        .trim()
        .is_empty()
    {
        fleet.router.ip(&["-4", "route", "del", &vip])?;
    }
    let mut config = format!(
        "router id {router_id};\n\
         log stderr all;\n\
         protocol device {{ }}\n\
         protocol kernel {{\n  \
           ipv4 {{ import none; export where source = RTS_BGP; }};\n  \
           merge paths on;\n\
         }}\n\
         template bgp mux {{\n  \
           {TIMERS}\n  \
           ipv4 {{ import where net ~ [ 198.18.100.0/24{{32,32}} ]; export none; }};\n\
         }}\n",
        router_id = Fleet::ROUTER_CLIENT_SIDE,
    );
    for &i in muxes {
        // Infallible: writing to a String.
        let _ = writeln!(
            config,
            "protocol bgp {} from mux {{ local {} as {ROUTER_AS}; neighbor {} as {MUX_AS}; }}",
            router_session(i),
            Fleet::router_mux_side(i),
            Fleet::mux_address(i),
        );
    }
    start(lab, &fleet.router, "bird-router", &config)
}

/// Starts the BGP speaker in mux `i`'s namespace (1-based): it announces [`Fleet::VIP`]/32
/// from static protocol [`VIP_PROTOCOL`] to the router over session [`SPEAKER_SESSION`].
/// With `announce_at_start` false the protocol starts disabled, as in production: nothing is
/// announced until the health-check sidecar has found the node healthy and enabled it.
/// Returns once BIRD answers on its control socket.
pub fn start_speaker(
    lab: &mut Lab,
    fleet: &Fleet,
    i: usize,
    announce_at_start: bool,
) -> io::Result<Bird> {
    if i == 0 || i > fleet.plan().muxes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("no mux {i} (fleet has {})", fleet.plan().muxes),
        ));
    }
    let config = format!(
        "router id {mux};\n\
         log stderr all;\n\
         protocol device {{ }}\n\
         protocol static {VIP_PROTOCOL} {{ disabled {disabled}; ipv4; route {vip}/32 blackhole; }}\n\
         protocol bgp {SPEAKER_SESSION} {{\n  \
           local {mux} as {MUX_AS};\n  \
           neighbor {router} as {ROUTER_AS};\n  \
           {TIMERS}\n  \
           ipv4 {{ import none; export where proto = \"{VIP_PROTOCOL}\"; }};\n\
         }}\n",
        mux = Fleet::mux_address(i),
        vip = Fleet::VIP,
        router = Fleet::router_mux_side(i),
        disabled = if announce_at_start { "no" } else { "yes" },
    );
    start(lab, fleet.mux(i), &format!("bird-mux{i}"), &config)
}

/// Writes `{name}.conf` to the lab's directory, starts `bird -f` with it in `ns` and waits
/// until its control socket `{name}.ctl` answers.
fn start(lab: &mut Lab, ns: &Namespace, name: &str, config_text: &str) -> io::Result<Bird> {
    let config = lab.log_dir().join(format!("{name}.conf"));
    let socket = lab.log_dir().join(format!("{name}.ctl"));
    let pid_file = lab.log_dir().join(format!("{name}.pid"));
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "control socket path {} is longer than a Unix socket allows (set a shorter TMPDIR)",
                socket.display()
            ),
        ));
    }
    fs::write(&config, config_text)?;
    let pid = lab.spawn(
        ns,
        Command::new("bird")
            .arg("-f")
            .arg("-c")
            .arg(&config)
            .arg("-s")
            .arg(&socket)
            .arg("-P")
            .arg(&pid_file),
    )?;
    let bird = Bird {
        pid,
        socket,
        config,
        ns: ns.clone(),
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let answer = bird.birdc(&["show", "status"]);
        if answer.is_ok() {
            return Ok(bird);
        }
        let exited = lab.wait(pid, Duration::ZERO);
        if exited.is_some() || Instant::now() >= deadline {
            let why = match exited {
                Some(status) => format!("exited ({status})"),
                None => format!("does not answer after {START_TIMEOUT:?}"),
            };
            return Err(io::Error::other(format!(
                "BIRD {name} in {ns} {why}; config {}:\n{config_text}\n--- log ---\n{}",
                bird.config.display(),
                lab.log(pid).trim_end()
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The next hops of `router`'s kernel route for [`Fleet::VIP`]/32, in the route's order:
/// one address for a single-gateway route, all of them for a multipath route, none when
/// there is no route (or one without a gateway, e.g. a blackhole). Of several routes with
/// different metrics, the one the kernel uses (lowest metric) counts.
pub fn vip_nexthops(router: &Namespace) -> io::Result<Vec<Ipv4Addr>> {
    let vip = format!("{}/32", Fleet::VIP);
    let out = router.ip(&["-4", "-j", "route", "show", &vip])?;
    parse_nexthops(&out)
}

/// Polls [`vip_nexthops`] every 5 ms until its set of next hops equals `expected` (order does
/// not matter; empty: no route) and returns how long that took. After `timeout` the error
/// (kind `TimedOut`) names what was seen last.
pub fn wait_for_nexthops(
    router: &Namespace,
    expected: &[Ipv4Addr],
    timeout: Duration,
) -> io::Result<Duration> {
    let start = Instant::now();
    let mut want = expected.to_vec();
    want.sort_unstable();
    want.dedup();
    loop {
        let mut seen = vip_nexthops(router)?;
        seen.sort_unstable();
        if seen == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "router {router}: VIP {} via {seen:?} after {timeout:?}, expected via {want:?}",
                    Fleet::VIP
                ),
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The next hops of the lowest-metric route in `ip -j route show` output.
fn parse_nexthops(json: &str) -> io::Result<Vec<Ipv4Addr>> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let routes: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| io::Error::other(format!("bad `ip -j route` output ({e}): {json}")))?;
    let Some(route) = routes
        .as_array()
        .and_then(|all| all.iter().min_by_key(|r| r["metric"].as_u64().unwrap_or(0)))
    else {
        return Ok(Vec::new());
    };
    let gateways: Vec<&serde_json::Value> = match route["nexthops"].as_array() {
        Some(hops) => hops.iter().map(|h| &h["gateway"]).collect(),
        None if route.get("gateway").is_some() => vec![&route["gateway"]],
        None => Vec::new(),
    };
    gateways
        .into_iter()
        .map(|g| {
            g.as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| io::Error::other(format!("odd IPv4 gateway {g} in {route}")))
        })
        .collect()
}

/// The `birdc show protocols` line of protocol `name`, if there is one.
fn parse_protocol(out: &str, name: &str) -> Option<Protocol> {
    out.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != name {
            return None;
        }
        let mut next = || words.next().map(str::to_owned);
        let (proto, table, state, since) = (next()?, next()?, next()?, next()?);
        Some(Protocol {
            name: name.to_owned(),
            proto,
            table,
            state,
            since,
            info: words.collect::<Vec<_>>().join(" "),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nexthops_of_single_multipath_and_missing_routes() {
        let single = r#"[{"dst":"198.18.100.1","gateway":"198.18.12.2","dev":"r-m2","protocol":"bird","metric":32,"flags":[]}]"#;
        assert_eq!(
            parse_nexthops(single).unwrap(),
            [Ipv4Addr::new(198, 18, 12, 2)]
        );
        let multi = r#"[{"dst":"198.18.100.1","protocol":"bird","metric":32,"flags":[],"nexthops":[{"gateway":"198.18.11.2","dev":"r-m1","weight":1,"flags":[]},{"gateway":"198.18.12.2","dev":"r-m2","weight":1,"flags":[]}]}]"#;
        assert_eq!(
            parse_nexthops(multi).unwrap(),
            [Ipv4Addr::new(198, 18, 11, 2), Ipv4Addr::new(198, 18, 12, 2)]
        );
        assert!(parse_nexthops("[ ]").unwrap().is_empty());
        assert!(parse_nexthops("").unwrap().is_empty());
        let blackhole = r#"[{"type":"blackhole","dst":"198.18.100.1","flags":[]}]"#;
        assert!(parse_nexthops(blackhole).unwrap().is_empty());
    }

    #[test]
    fn the_lowest_metric_route_counts() {
        let two = r#"[{"dst":"198.18.100.1","gateway":"198.18.12.2","metric":32},
                      {"dst":"198.18.100.1","gateway":"198.18.11.2"}]"#;
        assert_eq!(
            parse_nexthops(two).unwrap(),
            [Ipv4Addr::new(198, 18, 11, 2)]
        );
    }

    #[test]
    fn protocol_lines_parse() {
        let out = "BIRD 2.0.12 ready.\n\
                   Name       Proto      Table      State  Since         Info\n\
                   mux1       BGP        ---        up     07:21:07.467  Established\n\
                   mux12      BGP        ---        start  07:21:07.467  Active        Socket: Connection refused\n";
        let p = parse_protocol(out, "mux1").unwrap();
        assert_eq!(
            (
                p.proto.as_str(),
                p.state.as_str(),
                p.since.as_str(),
                p.info.as_str()
            ),
            ("BGP", "up", "07:21:07.467", "Established")
        );
        let p = parse_protocol(out, "mux12").unwrap();
        assert_eq!(p.info, "Active Socket: Connection refused");
        assert!(parse_protocol(out, "mux2").is_none());
    }
}
