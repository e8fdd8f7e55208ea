//! The check model: what one health check does (TCP connect, HTTP GET, UDP request/reply) and
//! its timing (interval, timeout, rise, fall, jitter), parsed from TOML and validated.
//!
//! Invariant: a [`CheckConfig`] that [`CheckConfig::validate`] accepts can be run by the
//! health-check engine (`lb_healthcheck::engine`) as it is: its timeout is shorter than its
//! interval, its interval is at least [`MIN_INTERVAL_MS`], rise and fall are at least 1, and
//! what it writes on the wire (HTTP path and host, UDP payload) cannot break the request
//! framing. Problems are reported as [`Problem`]s naming the field as a path
//! (`vip[0].check.timeout_ms`) and the reason, in the style of `lb_core::config`.
//!
//! The TOML form is one flat table whose `type` picks the kind:
//!
//! ```toml
//! [check]
//! type = "http"          # "tcp", "http" or "udp"
//! path = "/healthz"      # http: request path (default "/")
//! host = "www.example"   # http: Host header (default: the backend's address and port)
//! expect_status = 200    # http: the status that counts as healthy (default 200)
//! # send = "ping"        # udp: the datagram sent
//! # expect = "pong"      # udp: a reply must start with this ("" accepts any reply)
//! port = 8080            # default: the VIP's port
//! interval_ms = 2000
//! timeout_ms = 1000
//! rise = 2
//! fall = 3
//! jitter_percent = 10
//! ```
//!
//! Unknown fields are errors, and so are fields of another kind (`path` on a `tcp` check), so a
//! misplaced setting is never silently ignored.
//!
//! The module also holds the sidecar's own section, [`HealthcheckConfig`] (`[healthcheck]`,
//! with `agent_check`, `[[healthcheck.agent]]` and `[healthcheck.bgp]`). Invariant of a
//! validated section: the agent check names its port; every `[[healthcheck.agent]]` backend is
//! a backend of some VIP, listed once; and with `speaker = "bird"` every VIP address has a BIRD
//! protocol and every protocol is for a VIP address, so every address can be withdrawn.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::config::{Problem, VipConfig};
use serde::{Deserialize, Serialize};

/// The shortest interval accepted between two probes of one check.
pub const MIN_INTERVAL_MS: u32 = 100;
/// The longest interval accepted (one hour).
pub const MAX_INTERVAL_MS: u32 = 3_600_000;
/// The largest rise or fall count accepted.
pub const MAX_RISE_FALL: u32 = 1000;
/// The largest jitter accepted, in percent of the interval.
pub const MAX_JITTER_PERCENT: u32 = 50;
/// The largest UDP payload (sent or expected) accepted: fits an Ethernet frame unfragmented.
pub const MAX_UDP_PAYLOAD: usize = 1400;
/// The longest HTTP path accepted.
pub const MAX_HTTP_PATH: usize = 1024;
/// The longest HTTP Host header accepted.
pub const MAX_HTTP_HOST: usize = 255;

/// What a check does on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CheckKind {
    /// Success: a TCP connection is established within the timeout (then closed).
    Tcp,
    /// Success: over a new TCP connection, `GET path` is answered with `expect_status` within
    /// the timeout (only the status line is read).
    Http {
        /// The request path; starts with `/`.
        path: String,
        /// The Host header; `None` sends the backend's `address:port`.
        host: Option<String>,
        /// The status code that counts as healthy.
        expect_status: u16,
    },
    /// Success: after sending `send` in one datagram, a reply starting with `expect` arrives
    /// from the backend within the timeout. An ICMP port unreachable fails the probe at once.
    Udp {
        /// The datagram sent.
        send: String,
        /// The prefix a reply must have; empty accepts any reply.
        expect: String,
    },
}

impl CheckKind {
    /// The name used for `type` in the config.
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http { .. } => "http",
            Self::Udp { .. } => "udp",
        }
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => f.write_str("tcp"),
            Self::Http {
                path,
                host,
                expect_status,
            } => {
                write!(f, "http GET {path}")?;
                if let Some(host) = host {
                    write!(f, " host {host}")?;
                }
                write!(f, " expect {expect_status}")
            }
            Self::Udp { send, expect } => write!(f, "udp send {send:?} expect {expect:?}"),
        }
    }
}

/// One health check: its kind and its timing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawCheck", into = "RawCheck")]
pub struct CheckConfig {
    /// What the probe does.
    pub kind: CheckKind,
    /// The port probed; `None` probes the VIP's port on the backend.
    pub port: Option<u16>,
    /// Time between the starts of two probes (before jitter), in milliseconds.
    pub interval_ms: u32,
    /// How long a probe may take before it counts as failed, in milliseconds; below the interval.
    pub timeout_ms: u32,
    /// Consecutive successes that turn an unhealthy backend healthy.
    pub rise: u32,
    /// Consecutive failures that turn a healthy backend unhealthy.
    pub fall: u32,
    /// Each interval is stretched or shrunk by up to this percentage (deterministically per
    /// probe, see `lb_healthcheck::engine`), so that probes do not align.
    pub jitter_percent: u32,
}

impl Default for CheckConfig {
    /// A TCP check with the default timing.
    fn default() -> Self {
        Self {
            kind: CheckKind::Tcp,
            port: None,
            interval_ms: DEFAULT_INTERVAL_MS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            jitter_percent: DEFAULT_JITTER_PERCENT,
        }
    }
}

/// Default `interval_ms`.
pub const DEFAULT_INTERVAL_MS: u32 = 2000;
/// Default `timeout_ms`.
pub const DEFAULT_TIMEOUT_MS: u32 = 1000;
/// Default `rise`.
pub const DEFAULT_RISE: u32 = 2;
/// Default `fall`.
pub const DEFAULT_FALL: u32 = 3;
/// Default `jitter_percent`.
pub const DEFAULT_JITTER_PERCENT: u32 = 10;
/// Default HTTP `path`.
pub const DEFAULT_HTTP_PATH: &str = "/";
/// Default HTTP `expect_status`.
pub const DEFAULT_EXPECT_STATUS: u16 = 200;

/// The `type` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum CheckType {
    Tcp,
    Http,
    Udp,
}

/// The flat TOML table, before the kind-specific fields are sorted out.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    #[serde(rename = "type")]
    kind: CheckType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expect_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    send: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(default = "default_interval")]
    interval_ms: u32,
    #[serde(default = "default_timeout")]
    timeout_ms: u32,
    #[serde(default = "default_rise")]
    rise: u32,
    #[serde(default = "default_fall")]
    fall: u32,
    #[serde(default = "default_jitter")]
    jitter_percent: u32,
}

fn default_interval() -> u32 {
    DEFAULT_INTERVAL_MS
}
fn default_timeout() -> u32 {
    DEFAULT_TIMEOUT_MS
}
fn default_rise() -> u32 {
    DEFAULT_RISE
}
fn default_fall() -> u32 {
    DEFAULT_FALL
}
fn default_jitter() -> u32 {
    DEFAULT_JITTER_PERCENT
}

impl TryFrom<RawCheck> for CheckConfig {
    type Error = String;

    fn try_from(raw: RawCheck) -> Result<Self, String> {
        let only_http = [
            ("path", raw.path.is_some()),
            ("host", raw.host.is_some()),
            ("expect_status", raw.expect_status.is_some()),
        ];
        let only_udp = [
            ("send", raw.send.is_some()),
            ("expect", raw.expect.is_some()),
        ];
        let (ty, foreign): (&str, Vec<&[(&str, bool)]>) = match raw.kind {
            CheckType::Tcp => ("tcp", vec![&only_http, &only_udp]),
            CheckType::Http => ("http", vec![&only_udp]),
            CheckType::Udp => ("udp", vec![&only_http]),
        };
        if let Some((field, _)) = foreign.iter().flat_map(|f| f.iter()).find(|(_, set)| *set) {
            return Err(format!(
                "`{field}` does not apply to a check of type = \"{ty}\""
            ));
        }
        let kind = match raw.kind {
            CheckType::Tcp => CheckKind::Tcp,
            CheckType::Http => CheckKind::Http {
                path: raw.path.unwrap_or_else(|| DEFAULT_HTTP_PATH.to_owned()),
                host: raw.host,
                expect_status: raw.expect_status.unwrap_or(DEFAULT_EXPECT_STATUS),
            },
            CheckType::Udp => CheckKind::Udp {
                send: raw
                    .send
                    .ok_or("a udp check needs `send`: the datagram to send")?,
                expect: raw.expect.ok_or(
                    "a udp check needs `expect`: the prefix of the expected reply (\"\" accepts any)",
                )?,
            },
        };
        Ok(Self {
            kind,
            port: raw.port,
            interval_ms: raw.interval_ms,
            timeout_ms: raw.timeout_ms,
            rise: raw.rise,
            fall: raw.fall,
            jitter_percent: raw.jitter_percent,
        })
    }
}

impl From<CheckConfig> for RawCheck {
    fn from(c: CheckConfig) -> Self {
        let mut raw = Self {
            kind: CheckType::Tcp,
            path: None,
            host: None,
            expect_status: None,
            send: None,
            expect: None,
            port: c.port,
            interval_ms: c.interval_ms,
            timeout_ms: c.timeout_ms,
            rise: c.rise,
            fall: c.fall,
            jitter_percent: c.jitter_percent,
        };
        match c.kind {
            CheckKind::Tcp => {}
            CheckKind::Http {
                path,
                host,
                expect_status,
            } => {
                raw.kind = CheckType::Http;
                raw.path = Some(path);
                raw.host = host;
                raw.expect_status = Some(expect_status);
            }
            CheckKind::Udp { send, expect } => {
                raw.kind = CheckType::Udp;
                raw.send = Some(send);
                raw.expect = Some(expect);
            }
        }
        raw
    }
}

impl CheckConfig {
    /// Parses and validates one check table given alone (as in a test or `lb check-config` of a
    /// snippet); fields are named relative to the table.
    pub fn from_toml(text: &str) -> Result<Self, Vec<Problem>> {
        let deserializer = toml::de::Deserializer::parse(text).map_err(|e| {
            vec![Problem {
                field: String::new(),
                reason: e.message().trim_end().to_owned(),
            }]
        })?;
        let check: Self = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            vec![Problem {
                field: if path == "." { String::new() } else { path },
                reason: e.inner().message().trim_end().to_owned(),
            }]
        })?;
        let problems = check.validate("");
        if problems.is_empty() {
            Ok(check)
        } else {
            Err(problems)
        }
    }

    /// Every rule a runnable check must satisfy; `at` is the check's own path (such as
    /// `vip[0].check`, or empty). Returns what is broken (empty: valid).
    #[must_use]
    pub fn validate(&self, at: &str) -> Vec<Problem> {
        let mut problems = Vec::new();
        self.validate_into(at, &mut |field, reason| {
            problems.push(Problem { field, reason });
        });
        problems
    }

    /// [`CheckConfig::validate`] reporting each problem to `fail(field, reason)`, for a caller
    /// that collects the problems of a whole file.
    pub fn validate_into(&self, at: &str, fail: &mut impl FnMut(String, String)) {
        let field = |name: &str| {
            if at.is_empty() {
                name.to_owned()
            } else {
                format!("{at}.{name}")
            }
        };
        if self.port == Some(0) {
            fail(field("port"), "port 0 cannot be probed".into());
        }
        if self.interval_ms < MIN_INTERVAL_MS || self.interval_ms > MAX_INTERVAL_MS {
            fail(
                field("interval_ms"),
                format!(
                    "{} ms is outside {MIN_INTERVAL_MS}..={MAX_INTERVAL_MS} ms",
                    self.interval_ms
                ),
            );
        }
        if self.timeout_ms == 0 {
            fail(
                field("timeout_ms"),
                "a timeout of 0 ms fails every probe".into(),
            );
        } else if self.timeout_ms >= self.interval_ms {
            fail(
                field("timeout_ms"),
                format!(
                    "the timeout ({} ms) must be shorter than the interval ({} ms): a probe must end before the next one starts",
                    self.timeout_ms, self.interval_ms
                ),
            );
        }
        for (name, value, meaning) in [
            ("rise", self.rise, "successes to turn healthy"),
            ("fall", self.fall, "failures to turn unhealthy"),
        ] {
            if value == 0 || value > MAX_RISE_FALL {
                fail(
                    field(name),
                    format!(
                        "{value} is outside 1..={MAX_RISE_FALL} (consecutive {meaning}; 1 turns dampening off)"
                    ),
                );
            }
        }
        if self.jitter_percent > MAX_JITTER_PERCENT {
            fail(
                field("jitter_percent"),
                format!(
                    "{}% is above {MAX_JITTER_PERCENT}%: the interval would vary by more than half",
                    self.jitter_percent
                ),
            );
        }
        match &self.kind {
            CheckKind::Tcp => {}
            CheckKind::Http {
                path,
                host,
                expect_status,
            } => {
                if !path.starts_with('/') {
                    fail(field("path"), format!("{path:?} does not start with '/'"));
                } else if path.len() > MAX_HTTP_PATH {
                    fail(
                        field("path"),
                        format!("{} bytes is longer than {MAX_HTTP_PATH}", path.len()),
                    );
                } else if !is_header_safe(path) {
                    fail(
                        field("path"),
                        format!("{path:?} has a space or a control character; percent-encode it"),
                    );
                }
                if let Some(host) = host
                    && (host.is_empty() || host.len() > MAX_HTTP_HOST || !is_header_safe(host))
                {
                    fail(
                        field("host"),
                        format!(
                            "{host:?} is not a host name: 1..={MAX_HTTP_HOST} bytes without spaces or control characters"
                        ),
                    );
                }
                if !(100..=599).contains(expect_status) {
                    fail(
                        field("expect_status"),
                        format!("{expect_status} is not an HTTP status (100..=599)"),
                    );
                }
            }
            CheckKind::Udp { send, expect } => {
                if send.is_empty() || send.len() > MAX_UDP_PAYLOAD {
                    fail(
                        field("send"),
                        format!("{} bytes is outside 1..={MAX_UDP_PAYLOAD}", send.len()),
                    );
                }
                if expect.len() > MAX_UDP_PAYLOAD {
                    fail(
                        field("expect"),
                        format!("{} bytes is longer than {MAX_UDP_PAYLOAD}", expect.len()),
                    );
                }
            }
        }
    }
}

/// The `[healthcheck]` section: how `lb healthcheck` (the sidecar next to a mux) learns the
/// backends' agent health, where it publishes health, and how it drives BGP.
///
/// The backends and their service checks come from the `[[vip]]` sections of the same file
/// (`[vip.check]`), so the sidecar and the mux it serves read one config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthcheckConfig {
    /// The control sockets of the muxes that receive health (`sync-health`). Empty: this
    /// node's own mux (`node.control_socket`).
    #[serde(default)]
    pub muxes: Vec<PathBuf>,
    /// The sidecar's own control socket (`lb status`); default `/run/lb/<node.name>-healthcheck.sock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    /// Where the sidecar's Prometheus metrics are served.
    #[serde(default = "default_healthcheck_metrics")]
    pub metrics_address: SocketAddr,
    /// The check of each backend's agent (`lb agent` with `agent.health_address`); its `port`
    /// is the agent's health port. A backend is healthy only while its service check and its
    /// agent check both pass. Absent: agents are not checked (the service check alone decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_check: Option<CheckConfig>,
    /// Agents that answer on another address than their backend's (a management address).
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentEndpoint>,
    /// BGP: whether and how this node announces its VIPs. Absent: no announcements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpConfig>,
}

/// The address a backend's agent answers its health check on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEndpoint {
    /// The backend (an address under some `[[vip.backend]]`).
    pub backend: IpAddr,
    /// The address its agent's health endpoint listens on (the port is `agent_check.port`).
    pub address: IpAddr,
}

/// Which BGP speaker the sidecar drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Speaker {
    /// The sidecar is an ExaBGP API process: it writes `announce route …` and `withdraw route …`
    /// lines on its standard output.
    Exabgp,
    /// BIRD: the sidecar runs `birdc enable|disable <protocol>` for each VIP address.
    Bird,
}

/// The `[healthcheck.bgp]` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpConfig {
    /// `exabgp` or `bird`.
    pub speaker: Speaker,
    /// BIRD's control socket.
    #[serde(default = "default_bird_socket")]
    pub bird_socket: PathBuf,
    /// BIRD: per VIP address, the protocol (typically a `static` one originating the /32 or
    /// /128) enabled to announce it and disabled to withdraw it. Every VIP address needs one.
    #[serde(default)]
    pub bird_protocols: BTreeMap<IpAddr, String>,
    /// How often the node's health (its mux answering, its workers progressing) is checked and
    /// the announcements decided, in milliseconds.
    #[serde(default = "default_decide_interval")]
    pub decide_interval_ms: u32,
    /// A mux worker whose last report is older than this is stuck: the node withdraws.
    #[serde(default = "default_worker_stall")]
    pub worker_stall_ms: u32,
}

/// Default `[healthcheck] metrics_address`: next to the mux's 127.0.0.1:9477.
pub const DEFAULT_HEALTHCHECK_METRICS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9478);
/// Default `bird_socket`, Debian's.
pub const DEFAULT_BIRD_SOCKET: &str = "/run/bird/bird.ctl";
/// Default `decide_interval_ms`.
pub const DEFAULT_DECIDE_INTERVAL_MS: u32 = 200;
/// Default `worker_stall_ms`: the workers report every 100 ms.
pub const DEFAULT_WORKER_STALL_MS: u32 = 1000;

fn default_healthcheck_metrics() -> SocketAddr {
    DEFAULT_HEALTHCHECK_METRICS
}
fn default_bird_socket() -> PathBuf {
    PathBuf::from(DEFAULT_BIRD_SOCKET)
}
fn default_decide_interval() -> u32 {
    DEFAULT_DECIDE_INTERVAL_MS
}
fn default_worker_stall() -> u32 {
    DEFAULT_WORKER_STALL_MS
}

impl HealthcheckConfig {
    /// The sidecar's control socket: `control_socket`, or `/run/lb/<node>-healthcheck.sock`.
    #[must_use]
    pub fn control_socket_path(&self, node: &str) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/run/lb/{node}-healthcheck.sock")))
    }

    /// Where `backend`'s agent answers (before the port): its [`AgentEndpoint`], or itself.
    #[must_use]
    pub fn agent_address(&self, backend: IpAddr) -> IpAddr {
        self.agents
            .iter()
            .find(|a| a.backend == backend)
            .map_or(backend, |a| a.address)
    }

    /// Every rule of the section, given the whole config's VIPs.
    pub fn validate_into(&self, vips: &[VipConfig], fail: &mut impl FnMut(String, String)) {
        let is_backend = |a: IpAddr| {
            vips.iter()
                .any(|v| v.backends.iter().any(|b| b.address == a))
        };
        if let Some(check) = &self.agent_check {
            check.validate_into("healthcheck.agent_check", fail);
            if check.port.is_none() {
                fail(
                    "healthcheck.agent_check.port".into(),
                    "set the agents' health port (agent.health_address on the backends)".into(),
                );
            }
        }
        let mut seen = BTreeMap::new();
        for (i, agent) in self.agents.iter().enumerate() {
            let at = format!("healthcheck.agent[{i}]");
            if !is_backend(agent.backend) {
                fail(
                    format!("{at}.backend"),
                    format!(
                        "{} is listed under no VIP: no [[vip.backend]] has this address",
                        agent.backend
                    ),
                );
            }
            if let Some(first) = seen.insert(agent.backend, i) {
                fail(
                    format!("{at}.backend"),
                    format!(
                        "{} is already listed in healthcheck.agent[{first}]",
                        agent.backend
                    ),
                );
            }
            if self.agent_check.is_none() {
                fail(
                    at,
                    "an agent address without [healthcheck.agent_check] is never checked".into(),
                );
            }
        }
        if let Some(bgp) = &self.bgp {
            bgp.validate_into(vips, fail);
        }
    }
}

impl BgpConfig {
    fn validate_into(&self, vips: &[VipConfig], fail: &mut impl FnMut(String, String)) {
        if !(50..=10_000).contains(&self.decide_interval_ms) {
            fail(
                "healthcheck.bgp.decide_interval_ms".into(),
                format!("{} ms is outside 50..=10000", self.decide_interval_ms),
            );
        }
        if self.worker_stall_ms < 200 {
            fail(
                "healthcheck.bgp.worker_stall_ms".into(),
                format!(
                    "{} ms is below 200: workers report every 100 ms, so a busy one would look stuck",
                    self.worker_stall_ms
                ),
            );
        }
        match self.speaker {
            Speaker::Exabgp => {
                if !self.bird_protocols.is_empty() {
                    fail(
                        "healthcheck.bgp.bird_protocols".into(),
                        "bird_protocols only apply to speaker = \"bird\"".into(),
                    );
                }
            }
            Speaker::Bird => {
                for (address, protocol) in &self.bird_protocols {
                    let at = format!("healthcheck.bgp.bird_protocols.\"{address}\"");
                    if !vips.iter().any(|v| v.address == *address) {
                        fail(at.clone(), format!("{address} is no VIP's address"));
                    }
                    if protocol.is_empty()
                        || !protocol
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        fail(
                            at,
                            format!(
                                "{protocol:?} is not a BIRD protocol name (letters, digits, '_')"
                            ),
                        );
                    }
                }
                let mut addresses: Vec<IpAddr> = vips.iter().map(|v| v.address).collect();
                addresses.sort_unstable();
                addresses.dedup();
                for address in addresses {
                    if !self.bird_protocols.contains_key(&address) {
                        fail(
                            "healthcheck.bgp.bird_protocols".into(),
                            format!(
                                "VIP address {address} has no BIRD protocol: it could never be withdrawn"
                            ),
                        );
                    }
                }
            }
        }
    }
}

/// Whether `s` can go into an HTTP request line or header as it is.
fn is_header_safe(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        CheckConfig::from_toml(text).expect_err("the check should be rejected")
    }

    fn fields(text: &str) -> Vec<String> {
        problems(text).into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn defaults() {
        let check = CheckConfig::from_toml("type = \"tcp\"").unwrap();
        assert_eq!(check, CheckConfig::default());
        let http = CheckConfig::from_toml("type = \"http\"").unwrap();
        assert_eq!(
            http.kind,
            CheckKind::Http {
                path: "/".into(),
                host: None,
                expect_status: 200
            }
        );
        assert_eq!(
            (
                http.interval_ms,
                http.timeout_ms,
                http.rise,
                http.fall,
                http.jitter_percent
            ),
            (2000, 1000, 2, 3, 10)
        );
    }

    #[test]
    fn full_http_and_udp() {
        let http = CheckConfig::from_toml(
            r#"
            type = "http"
            path = "/healthz?deep=1"
            host = "www.example"
            expect_status = 204
            port = 8080
            interval_ms = 500
            timeout_ms = 200
            rise = 1
            fall = 5
            jitter_percent = 0
            "#,
        )
        .unwrap();
        assert_eq!(http.port, Some(8080));
        assert_eq!(
            http.kind,
            CheckKind::Http {
                path: "/healthz?deep=1".into(),
                host: Some("www.example".into()),
                expect_status: 204
            }
        );
        let udp =
            CheckConfig::from_toml("type = \"udp\"\nsend = \"ping\"\nexpect = \"pong\"").unwrap();
        assert_eq!(
            udp.kind,
            CheckKind::Udp {
                send: "ping".into(),
                expect: "pong".into()
            }
        );
    }

    #[test]
    fn round_trips_through_toml() {
        for text in [
            "type = \"tcp\"\nport = 22",
            "type = \"http\"\nhost = \"a.example\"",
            "type = \"udp\"\nsend = \"x\"\nexpect = \"\"",
        ] {
            let check = CheckConfig::from_toml(text).unwrap();
            let again = CheckConfig::from_toml(&toml::to_string(&check).unwrap()).unwrap();
            assert_eq!(check, again);
        }
    }

    #[test]
    fn unknown_type_names_the_field() {
        let p = problems("type = \"icmp\"");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].field, "type");
        assert!(p[0].reason.contains("icmp"), "{}", p[0].reason);
        assert!(p[0].reason.contains("tcp"), "{}", p[0].reason);
        let missing = problems("interval_ms = 1000");
        assert!(missing[0].reason.contains("type"), "{}", missing[0]);
    }

    #[test]
    fn unknown_and_misplaced_fields() {
        let p = problems("type = \"tcp\"\nintreval_ms = 100");
        assert!(p[0].reason.contains("intreval_ms"), "{}", p[0]);
        let p = problems("type = \"tcp\"\npath = \"/\"");
        assert!(p[0].reason.contains("`path`"), "{}", p[0]);
        assert!(p[0].reason.contains("tcp"), "{}", p[0]);
        let p = problems("type = \"http\"\nsend = \"x\"");
        assert!(p[0].reason.contains("`send`"), "{}", p[0]);
        let p = problems("type = \"udp\"\nexpect = \"x\"");
        assert!(p[0].reason.contains("`send`"), "{}", p[0]);
    }

    #[test]
    fn timing_rules() {
        let p = problems("type = \"tcp\"\ninterval_ms = 1000\ntimeout_ms = 1000");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].field, "timeout_ms");
        assert!(
            p[0].reason.contains("shorter than the interval"),
            "{}",
            p[0]
        );
        assert_eq!(
            fields("type = \"tcp\"\ninterval_ms = 50\ntimeout_ms = 10"),
            ["interval_ms"]
        );
        assert_eq!(fields("type = \"tcp\"\ntimeout_ms = 0"), ["timeout_ms"]);
        assert_eq!(
            fields("type = \"tcp\"\nrise = 0\nfall = 0"),
            ["rise", "fall"]
        );
        assert_eq!(
            fields("type = \"tcp\"\njitter_percent = 51"),
            ["jitter_percent"]
        );
        assert_eq!(fields("type = \"tcp\"\nport = 0"), ["port"]);
        let negative = problems("type = \"tcp\"\nrise = -1");
        assert_eq!(negative[0].field, "rise");
    }

    #[test]
    fn wire_rules() {
        assert_eq!(fields("type = \"http\"\npath = \"healthz\""), ["path"]);
        assert_eq!(fields("type = \"http\"\npath = \"/a b\""), ["path"]);
        assert_eq!(
            fields("type = \"http\"\nhost = \"a\\r\\nX-Evil: 1\""),
            ["host"]
        );
        assert_eq!(
            fields("type = \"http\"\nexpect_status = 99"),
            ["expect_status"]
        );
        assert_eq!(
            fields("type = \"udp\"\nsend = \"\"\nexpect = \"\""),
            ["send"]
        );
    }

    #[test]
    fn validate_prefixes_the_path() {
        let check = CheckConfig {
            timeout_ms: 5000,
            ..CheckConfig::default()
        };
        let p = check.validate("vip[2].check");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].field, "vip[2].check.timeout_ms");
        assert!(p[0].to_string().starts_with("vip[2].check.timeout_ms: "));
    }
}
