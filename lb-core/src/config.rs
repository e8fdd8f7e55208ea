//! The configuration model: a TOML file parsed into typed structs, then validated.
//!
//! Invariant: a [`Config`] value has passed [`Config::validate`]: every table it describes can be
//! built, every backend can be reached with the node's addresses, and no two VIPs overlap. Code
//! that receives a `Config` does not check these again. A file that fails is reported as a
//! [`ConfigError`] naming the file, the field (as a path such as `vip[1].backend[0].weight`) and
//! the reason, and nothing of it is used: the caller keeps serving its old config.
//!
//! The file format is documented field by field in `config/README.md`. Unknown fields are errors,
//! so a misspelt setting is never silently ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::maglev::{
    self, BackendId, DEFAULT_TABLE_SIZE, MAX_BACKENDS, MAX_TABLE_SIZE, MAX_WEIGHT, MaglevTable,
    TableError, WeightedBackend,
};

/// The longest VIP name accepted.
pub const MAX_VIP_NAME: usize = 64;

/// The config format version this build reads.
pub const CONFIG_VERSION: u32 = 1;

/// A validated configuration: the node's own settings and the VIPs it serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Format version; only [`CONFIG_VERSION`] is accepted.
    #[serde(default = "default_version")]
    pub version: u32,
    /// This node's settings.
    pub node: NodeConfig,
    /// The virtual IPs, each with its backends.
    #[serde(default, rename = "vip")]
    pub vips: Vec<VipConfig>,
    /// Egress SNAT (Ananta): per VIP address, the port space its backends share for outbound
    /// connections with the VIP as source.
    #[serde(default, rename = "snat")]
    pub snats: Vec<crate::snat::SnatConfig>,
    /// The backend agent's settings (`lb agent`); muxes ignore them.
    #[serde(default)]
    pub agent: Option<AgentConfig>,
    /// The health-check sidecar's settings (`lb healthcheck`); muxes and agents ignore them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<crate::check::HealthcheckConfig>,
}

/// Settings of `lb agent` on a backend host. The host's own address (its identity in the VIPs'
/// backend lists, and the outer source when it chains a packet on) is `node.address_v4` or
/// `node.address_v6`; encapsulated packets arrive on `node.interface`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The TUN device decapsulated packets are written into (created if missing).
    #[serde(default = "default_tun")]
    pub tun: String,
    /// Where encapsulated packets may come from: the muxes' addresses or prefixes. Anything
    /// else is dropped and counted (it would let anyone inject traffic for a VIP).
    pub muxes: Vec<ipnet::IpNet>,
    /// Daisy chaining (Beamer): pass a non-SYN TCP packet that names a previous backend (GRE
    /// key) for a connection this host does not have on to that backend, once. The window is
    /// the muxes' (`node.chain_window_seconds`): they name a previous backend only within it.
    #[serde(default = "default_true")]
    pub chaining: bool,
    /// Egress SNAT: destinations ("the Internet") whose connections from this host's own
    /// address leave with a VIP as source. The agent steers them into its TUN by policy
    /// routing (`ip rule from <address> to <prefix> lookup 4242`, a default route into the TUN
    /// in table 4242). Empty: no egress SNAT from this host.
    #[serde(default)]
    pub egress: Vec<ipnet::IpNet>,
    /// Where the agent answers `GET /healthz` (200 while its packet loop runs, 503 otherwise),
    /// for the health-check sidecars of the muxes. Absent: no health endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_address: Option<SocketAddr>,
}

/// Settings of the node running `lb`: where it sends from and how it treats traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// A name for logs and metrics.
    #[serde(default = "default_node_name")]
    pub name: String,
    /// The interface the mux receives VIP traffic on.
    #[serde(default)]
    pub interface: Option<String>,
    /// Outer source address for encapsulation to IPv4 backends.
    #[serde(default)]
    pub address_v4: Option<IpAddr>,
    /// Outer source address for encapsulation to IPv6 backends.
    #[serde(default)]
    pub address_v6: Option<IpAddr>,
    /// Worker threads; 0 means one per CPU core.
    #[serde(default)]
    pub workers: u16,
    /// MTU of the link towards the backends; larger encapsulated packets get an ICMP error.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// TTL / hop limit of the outer header.
    #[serde(default = "default_ttl")]
    pub ttl: u8,
    /// What to do with packets that match no VIP.
    #[serde(default)]
    pub unmatched: Unmatched,
    /// Connection-table slots per worker (rounded up to a power of two).
    #[serde(default = "default_conntrack_capacity")]
    pub conntrack_capacity: u32,
    /// The control socket (Unix, mode 0600) of `lb status` and the health-check sidecar;
    /// default `/run/lb/<name>.sock`.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Where the Prometheus exporter listens (`/metrics`); loopback by default.
    #[serde(default = "default_metrics_address")]
    pub metrics_address: SocketAddr,
    /// Daisy chaining (Beamer): for this long after a table change, a GRE VIP's packets whose
    /// backend changed carry the previous backend in the GRE key; 0 turns it off.
    #[serde(default = "default_chain_window")]
    pub chain_window_seconds: u32,
}

impl NodeConfig {
    /// The control socket's path: `control_socket`, or `/run/lb/<name>.sock`.
    #[must_use]
    pub fn control_socket_path(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/run/lb/{}.sock", self.name)))
    }
}

/// What happens to packets that match no VIP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Hand them to the host's own stack (BGP, SSH, health checks keep working).
    #[default]
    Pass,
    /// Drop them and count them.
    Drop,
}

/// A virtual IP: an address, protocol and port (or all ports), spread over backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipConfig {
    /// A unique name, used by `lb table --vip`, logs and metric labels: 1 to [`MAX_VIP_NAME`]
    /// ASCII letters, digits, `-`, `_` or `.`.
    pub name: String,
    /// The virtual IP address, IPv4 or IPv6.
    pub address: IpAddr,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// A port number, or `"all"` for every port of the protocol.
    pub port: PortSpec,
    /// How packets reach the backends: `ipip` (IP-in-IP) or `gre`.
    pub encap: Encap,
    /// The Maglev table size M: a prime, at least the number of backends (ideally 100×).
    #[serde(default = "default_table_size")]
    pub table_size: u32,
    /// The backends.
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// The health check of every backend of this VIP (`lb healthcheck`). Absent: the backends'
    /// service is not probed (only their agents, if `[healthcheck.agent_check]` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<crate::check::CheckConfig>,
}

/// A backend host of a VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The backend host's address: the outer destination of the encapsulation.
    pub address: IpAddr,
    /// Relative weight, 0..=65535; 0 drains the backend (no new flows).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// An optional name for logs and metrics.
    #[serde(default)]
    pub name: Option<String>,
}

/// Transport protocol of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => crate::flow::PROTO_TCP,
            Self::Udp => crate::flow::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// Encapsulation towards the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encap {
    /// IP-in-IP: IPv4 or IPv6 inner packet (protocol 4 or 41) in an outer header of the
    /// backend's family.
    Ipip,
    /// GRE (protocol 47, RFC 2784/2890) in an outer header of the backend's family.
    Gre,
}

impl fmt::Display for Encap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipip => "ipip",
            Self::Gre => "gre",
        })
    }
}

/// A VIP's port: one port, or all ports of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortSpec {
    /// Exactly this port (1..=65535).
    Port(u16),
    /// Every port.
    All,
}

impl PortSpec {
    /// Whether two VIP port specs on the same address and protocol would match the same packet.
    #[must_use]
    pub fn overlaps(self, other: Self) -> bool {
        match (self, other) {
            (Self::Port(a), Self::Port(b)) => a == b,
            _ => true,
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Port(p) => p.fmt(f),
            Self::All => f.write_str("all"),
        }
    }
}

impl Serialize for PortSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Port(p) => s.serialize_u16(*p),
            Self::All => s.serialize_str("all"),
        }
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortVisitor;
        impl Visitor<'_> for PortVisitor {
            type Value = PortSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number 1..=65535 or \"all\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortSpec, E> {
                match u16::try_from(v) {
                    Ok(p) if p > 0 => Ok(PortSpec::Port(p)),
                    _ => Err(E::custom(format!(
                        "port {v} is out of range 1..=65535 (or use \"all\")"
                    ))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortSpec, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortSpec, E> {
                if v == "all" {
                    Ok(PortSpec::All)
                } else {
                    Err(E::custom(format!(
                        "port {v:?} is neither a number 1..=65535 nor \"all\""
                    )))
                }
            }
        }
        d.deserialize_any(PortVisitor)
    }
}

fn default_version() -> u32 {
    CONFIG_VERSION
}
fn default_node_name() -> String {
    "lb".to_owned()
}
fn default_mtu() -> u16 {
    1500
}
fn default_ttl() -> u8 {
    64
}
fn default_tun() -> String {
    "lbtun0".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_chain_window() -> u32 {
    30
}
/// Default connection-table slots per worker: 2^18 (about 16.5 MiB: 66 bytes a slot).
pub const DEFAULT_CONNTRACK_CAPACITY: u32 = 1 << 18;
fn default_conntrack_capacity() -> u32 {
    DEFAULT_CONNTRACK_CAPACITY
}
/// Default Prometheus exporter address: loopback only.
pub const DEFAULT_METRICS_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9477);
fn default_metrics_address() -> SocketAddr {
    DEFAULT_METRICS_ADDRESS
}
fn default_table_size() -> u32 {
    DEFAULT_TABLE_SIZE
}
fn default_weight() -> u32 {
    1
}

/// One thing wrong (or worth a warning) in a config: the field and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Path of the field, such as `vip[1].backend[0].weight` (empty for the whole file).
    pub field: String,
    /// What is wrong, in words an operator can act on.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

/// A config that cannot be used, with every problem found in it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file (or other origin) of the config.
    pub file: PathBuf,
    /// What is wrong; never empty.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {p}", self.file.display())?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            problems: vec![Problem {
                field: String::new(),
                reason: format!("cannot read the file: {e}"),
            }],
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let origin = origin.as_ref();
        let fail = |problems| ConfigError {
            file: origin.to_owned(),
            problems,
        };
        let deserializer = toml::de::Deserializer::parse(text)
            .map_err(|e| fail(vec![parse_problem(text, "", &e)]))?;
        let config: Self = serde_path_to_error::deserialize(deserializer)
            .map_err(|e| fail(vec![parse_problem(text, &e.path().to_string(), e.inner())]))?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems))
        }
    }

    /// Every rule a usable config must satisfy; returns what is broken (empty: valid).
    #[must_use]
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut fail = |field: String, reason: String| problems.push(Problem { field, reason });
        if self.version != CONFIG_VERSION {
            fail(
                "version".into(),
                format!(
                    "version {} is not supported; this lb reads version {CONFIG_VERSION}",
                    self.version
                ),
            );
        }
        self.node.validate(&mut fail);
        if let Some(agent) = &self.agent {
            agent.validate(&mut fail);
        }
        self.validate_snat(&mut fail);
        if let Some(healthcheck) = &self.healthcheck {
            healthcheck.validate_into(&self.vips, &mut fail);
        }
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, vip) in self.vips.iter().enumerate() {
            let at = format!("vip[{i}]");
            if let Some(first) = names.insert(vip.name.as_str(), i) {
                fail(
                    format!("{at}.name"),
                    format!("VIP name {:?} is already used by vip[{first}]", vip.name),
                );
            }
            for (j, other) in self.vips[..i].iter().enumerate() {
                if other.address == vip.address
                    && other.protocol == vip.protocol
                    && other.port.overlaps(vip.port)
                {
                    fail(
                        at.clone(),
                        format!(
                            "duplicate VIP: {} {} port {} overlaps vip[{j}] ({:?}: {} {} port {})",
                            vip.address,
                            vip.protocol,
                            vip.port,
                            other.name,
                            other.address,
                            other.protocol,
                            other.port
                        ),
                    );
                }
            }
            vip.validate(&at, &self.node, &mut fail);
        }
        problems
    }

    /// SNAT sections: each valid, one per address, the address a VIP's, and no service port of
    /// that address inside the SNAT port space (a reply to it would be ambiguous).
    fn validate_snat(&self, fail: &mut impl FnMut(String, String)) {
        let mut seen: BTreeMap<IpAddr, usize> = BTreeMap::new();
        for (i, snat) in self.snats.iter().enumerate() {
            let at = format!("snat[{i}]");
            snat.validate(&at, fail);
            if let Some(first) = seen.insert(snat.address, i) {
                fail(
                    format!("{at}.address"),
                    format!("{} already has SNAT in snat[{first}]", snat.address),
                );
            }
            let on_address: Vec<(usize, &VipConfig)> = self
                .vips
                .iter()
                .enumerate()
                .filter(|(_, v)| v.address == snat.address)
                .collect();
            if on_address.is_empty() {
                fail(
                    format!("{at}.address"),
                    format!(
                        "{} is no VIP's address: return traffic to it would not reach the muxes' VIP match",
                        snat.address
                    ),
                );
            }
            for (j, v) in on_address {
                let clash = match v.port {
                    PortSpec::All => true,
                    PortSpec::Port(p) => (snat.first_port..=snat.last_port).contains(&p),
                };
                if clash {
                    fail(
                        at.clone(),
                        format!(
                            "ports {}..={} include vip[{j}] ({:?}, {} port {}): a reply to that port could not be told from a connection to the service; move the SNAT space",
                            snat.first_port, snat.last_port, v.name, v.protocol, v.port
                        ),
                    );
                }
            }
        }
    }

    /// The backends that share the SNAT port space of `address`: every backend of a VIP on it.
    #[must_use]
    pub fn snat_backends(&self, address: IpAddr) -> Vec<IpAddr> {
        let mut all: Vec<IpAddr> = self
            .vips
            .iter()
            .filter(|v| v.address == address)
            .flat_map(|v| v.backends.iter().map(|b| b.address))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Things that are valid but probably not what the operator wants (shown by
    /// `lb check-config`, logged on load).
    #[must_use]
    pub fn warnings(&self) -> Vec<Problem> {
        let mut warnings = Vec::new();
        for (i, vip) in self.vips.iter().enumerate() {
            let at = format!("vip[{i}]");
            let n = vip.backends.len() as u64;
            if n == 0 {
                warnings.push(Problem {
                    field: format!("{at}.backend"),
                    reason: format!("VIP {:?} has no backends: its traffic is dropped", vip.name),
                });
            } else if vip.backends.iter().all(|b| b.weight == 0) {
                warnings.push(Problem {
                    field: format!("{at}.backend"),
                    reason: format!(
                        "every backend of VIP {:?} has weight 0: new flows are dropped",
                        vip.name
                    ),
                });
            }
            if n > 0 && u64::from(vip.table_size) < 100 * n {
                warnings.push(Problem {
                    field: format!("{at}.table_size"),
                    reason: format!(
                        "{} slots for {n} backends is below 100 per backend: balance and disruption suffer (Maglev §3.4); consider {}",
                        vip.table_size,
                        suggested_table_size(n)
                    ),
                });
            }
        }
        warnings
    }

    /// The VIP with this name.
    #[must_use]
    pub fn vip(&self, name: &str) -> Option<&VipConfig> {
        self.vips.iter().find(|v| v.name == name)
    }
}

/// The smallest prime at least 100 × `backends` (and at least the default size).
fn suggested_table_size(backends: u64) -> u32 {
    let want = u32::try_from(backends.saturating_mul(100))
        .unwrap_or(MAX_TABLE_SIZE)
        .clamp(DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE);
    (want..=MAX_TABLE_SIZE)
        .find(|&p| maglev::is_prime(p))
        .unwrap_or(MAX_TABLE_SIZE)
}

impl NodeConfig {
    fn validate(&self, fail: &mut impl FnMut(String, String)) {
        if self.address_v4.is_none() && self.address_v6.is_none() {
            fail("node".into(), "set address_v4 and/or address_v6: the outer source address of encapsulated packets".into());
        }
        for (field, addr, want_v4) in [
            ("node.address_v4", self.address_v4, true),
            ("node.address_v6", self.address_v6, false),
        ] {
            if let Some(a) = addr {
                if a.is_ipv4() != want_v4 {
                    fail(
                        field.into(),
                        format!("{a} is not an IPv{} address", if want_v4 { 4 } else { 6 }),
                    );
                } else if let Some(why) = unusable_unicast(a) {
                    fail(field.into(), format!("{a} is {why}"));
                }
            }
        }
        if self.mtu < 576 {
            fail(
                "node.mtu".into(),
                format!("MTU {} is below the IPv4 minimum of 576", self.mtu),
            );
        }
        if self.ttl == 0 {
            fail(
                "node.ttl".into(),
                "TTL 0 would make every encapsulated packet expire".into(),
            );
        }
        if self.name.trim().is_empty() {
            fail("node.name".into(), "the node name is empty".into());
        } else if self.control_socket.is_none()
            && !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            fail(
                "node.name".into(),
                format!(
                    "{:?} cannot name the default control socket /run/lb/<name>.sock: use letters, digits, '-', '_', '.', or set node.control_socket",
                    self.name
                ),
            );
        }
        if self.chain_window_seconds > 3600 {
            fail(
                "node.chain_window_seconds".into(),
                format!(
                    "{} s is over an hour; moved connections should have settled long before",
                    self.chain_window_seconds
                ),
            );
        }
        if self.conntrack_capacity < 8 || self.conntrack_capacity > 1 << 26 {
            fail(
                "node.conntrack_capacity".into(),
                format!(
                    "{} slots is outside 8..=67108864 (2^26)",
                    self.conntrack_capacity
                ),
            );
        }
        if let Some(path) = &self.control_socket
            && path.as_os_str().is_empty()
        {
            fail(
                "node.control_socket".into(),
                "the control socket path is empty".into(),
            );
        }
    }
}

impl AgentConfig {
    fn validate(&self, fail: &mut impl FnMut(String, String)) {
        if self.tun.is_empty()
            || self.tun.len() > 15
            || !self
                .tun
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            fail(
                "agent.tun".into(),
                format!(
                    "{:?} is not a usable interface name (1 to 15 letters, digits, '-', '_', '.')",
                    self.tun
                ),
            );
        }
        if self.muxes.is_empty() {
            fail(
                "agent.muxes".into(),
                "list the muxes' addresses or prefixes: encapsulated packets from anywhere else are dropped".into(),
            );
        }
        for (i, net) in self.muxes.iter().enumerate() {
            if net.prefix_len() == 0 {
                fail(
                    format!("agent.muxes[{i}]"),
                    format!("{net} accepts encapsulated packets from anywhere"),
                );
            }
        }
    }
}

impl VipConfig {
    fn validate(&self, at: &str, node: &NodeConfig, fail: &mut impl FnMut(String, String)) {
        if self.name.is_empty()
            || self.name.len() > MAX_VIP_NAME
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            fail(
                format!("{at}.name"),
                format!(
                    "{:?} is not a VIP name: 1..={MAX_VIP_NAME} letters, digits, '-', '_' or '.' (it labels metrics and goes into control messages)",
                    self.name
                ),
            );
        }
        if let Some(check) = &self.check {
            check.validate_into(&format!("{at}.check"), fail);
            if check.port.is_none() && self.port == PortSpec::All {
                fail(
                    format!("{at}.check.port"),
                    "the VIP serves every port: name the port to probe".into(),
                );
            }
        }
        if let Some(why) = unusable_unicast(self.address) {
            fail(
                format!("{at}.address"),
                format!("{} is {why}", self.address),
            );
        }
        if !(2..=MAX_TABLE_SIZE).contains(&self.table_size) {
            fail(
                format!("{at}.table_size"),
                format!("{} is out of range 2..={MAX_TABLE_SIZE}", self.table_size),
            );
        } else if !maglev::is_prime(self.table_size) {
            let (below, above) = maglev::nearest_primes(self.table_size);
            fail(
                format!("{at}.table_size"),
                format!(
                    "{} is not prime; Maglev needs a prime size (nearest: {below} or {above})",
                    self.table_size
                ),
            );
        }
        if self.backends.len() > self.table_size as usize {
            fail(
                format!("{at}.table_size"),
                format!(
                    "{} slots are fewer than the {} backends of VIP {:?}",
                    self.table_size,
                    self.backends.len(),
                    self.name
                ),
            );
        }
        if self.backends.len() > MAX_BACKENDS {
            fail(
                format!("{at}.backend"),
                format!(
                    "{} backends exceed the limit of {MAX_BACKENDS}",
                    self.backends.len()
                ),
            );
        }
        let mut seen: BTreeMap<IpAddr, usize> = BTreeMap::new();
        for (j, b) in self.backends.iter().enumerate() {
            let here = format!("{at}.backend[{j}]");
            if let Some(first) = seen.insert(b.address, j) {
                fail(
                    format!("{here}.address"),
                    format!(
                        "backend {} is already listed as backend[{first}] of VIP {:?}",
                        b.address, self.name
                    ),
                );
            }
            if let Some(why) = unusable_unicast(b.address) {
                fail(format!("{here}.address"), format!("{} is {why}", b.address));
            }
            let (have_source, family) = match b.address {
                IpAddr::V4(_) => (node.address_v4.is_some(), "4"),
                IpAddr::V6(_) => (node.address_v6.is_some(), "6"),
            };
            if !have_source {
                fail(
                    format!("{here}.address"),
                    format!(
                        "backend {} is IPv{family} but node.address_v{family} is not set: {} encapsulation to it needs an IPv{family} outer source",
                        b.address,
                        match self.encap {
                            Encap::Ipip => "ipip",
                            Encap::Gre => "gre",
                        }
                    ),
                );
            }
            if b.weight > MAX_WEIGHT {
                fail(
                    format!("{here}.weight"),
                    format!("weight {} is above the maximum {MAX_WEIGHT}", b.weight),
                );
            }
        }
    }

    /// The backends as the Maglev table sees them.
    #[must_use]
    pub fn weighted_backends(&self) -> Vec<WeightedBackend> {
        self.backends
            .iter()
            .map(|b| WeightedBackend {
                id: BackendId(b.address),
                weight: b.weight,
            })
            .collect()
    }

    /// Builds this VIP's Maglev table.
    pub fn table(&self) -> Result<MaglevTable, TableError> {
        MaglevTable::build(self.table_size, &self.weighted_backends())
    }

    /// The backend config with this identity.
    #[must_use]
    pub fn backend(&self, id: BackendId) -> Option<&BackendConfig> {
        self.backends.iter().find(|b| b.address == id.0)
    }
}

/// Why an address cannot be a VIP, a backend or a source, if it cannot.
fn unusable_unicast(a: IpAddr) -> Option<&'static str> {
    if a.is_unspecified() {
        Some("the unspecified address")
    } else if a.is_multicast() {
        Some("a multicast address")
    } else if a == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else if let IpAddr::V6(v6) = a
        && v6.to_ipv4_mapped().is_some()
    {
        Some("an IPv4-mapped IPv6 address; write the IPv4 address instead")
    } else {
        None
    }
}

/// Turns a parse error into a [`Problem`] with the field path and the line and column.
fn parse_problem(text: &str, path: &str, inner: &toml::de::Error) -> Problem {
    let field = if path == "." {
        String::new()
    } else {
        path.to_owned()
    };
    let place = inner.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!(" (line {line}, column {column})")
    });
    Problem {
        field,
        reason: format!(
            "{}{}",
            inner.message().trim_end(),
            place.unwrap_or_default()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [node]
        name = "mux1"
        address_v4 = "198.18.11.2"

        [[vip]]
        name = "web"
        address = "198.18.100.1"
        protocol = "tcp"
        port = 80
        encap = "ipip"

        [[vip.backend]]
        address = "198.18.21.2"

        [[vip.backend]]
        address = "198.18.22.2"
        weight = 2
        name = "be2"
    "#;

    fn problems(text: &str) -> Vec<Problem> {
        Config::from_toml(text, "test.toml").unwrap_err().problems
    }

    fn only_problem(text: &str) -> Problem {
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:?}");
        p.into_iter().next().unwrap()
    }

    #[test]
    fn good_config_loads_with_defaults() {
        let c = Config::from_toml(GOOD, "test.toml").unwrap();
        assert_eq!(c.vips[0].table_size, DEFAULT_TABLE_SIZE);
        assert_eq!(c.vips[0].backends[0].weight, 1);
        assert_eq!(c.node.mtu, 1500);
        assert_eq!(c.node.unmatched, Unmatched::Pass);
        assert_eq!(c.vips[0].port, PortSpec::Port(80));
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        assert_eq!(
            c.vips[0].table().unwrap().slot_counts().iter().sum::<u32>(),
            DEFAULT_TABLE_SIZE
        );
    }

    #[test]
    fn agent_and_snat_sections_validate_with_field_paths() {
        let agent = format!(
            "{GOOD}\n[agent]\nmuxes = [\"198.18.11.0/24\"]\n[[snat]]\naddress = \"198.18.100.1\"\n"
        );
        let c = Config::from_toml(&agent, "t").unwrap();
        let a = c.agent.as_ref().unwrap();
        assert_eq!((a.tun.as_str(), a.chaining), ("lbtun0", true));
        assert_eq!(c.snats[0].first_port, 1024);
        assert_eq!(c.snat_backends("198.18.100.1".parse().unwrap()).len(), 2);
        let p = only_problem(&agent.replace("[\"198.18.11.0/24\"]", "[]"));
        assert_eq!(p.field, "agent.muxes");
        let p = only_problem(&agent.replace("198.18.11.0/24", "0.0.0.0/0"));
        assert_eq!(p.field, "agent.muxes[0]");
        let p = only_problem(&format!("{agent}first_port = 1\n"));
        assert_eq!(p.field, "snat[0]", "port 80 lies in the SNAT space: {p:?}");
        let p = only_problem(&format!("{agent}range_size = 6\n"));
        assert_eq!(p.field, "snat[0].range_size");
        let p = only_problem(
            &agent
                .replace("address = \"198.18.100.1\"\n\n", "x")
                .replace(
                    "[[snat]]\naddress = \"198.18.100.1\"",
                    "[[snat]]\naddress = \"198.18.100.7\"",
                ),
        );
        assert_eq!(p.field, "snat[0].address", "{p:?}");
    }

    #[test]
    fn unknown_field_names_the_field_and_line() {
        let p = only_problem(&GOOD.replace("weight = 2", "wieght = 2"));
        assert_eq!(p.field, "vip[0].backend[1].wieght");
        assert!(p.reason.contains("unknown field `wieght`"), "{}", p.reason);
        assert!(p.reason.contains("line 18, column 9"), "{}", p.reason);
    }

    #[test]
    fn error_display_names_the_file() {
        let e =
            Config::from_toml(&GOOD.replace("port = 80", "port = 0"), "config/x.toml").unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.starts_with("config/x.toml: vip[0].port: port 0 is out of range"),
            "{shown}"
        );
    }

    #[test]
    fn port_all_and_bad_ports() {
        let c = Config::from_toml(&GOOD.replace("port = 80", "port = \"all\""), "t").unwrap();
        assert_eq!(c.vips[0].port, PortSpec::All);
        assert!(
            only_problem(&GOOD.replace("port = 80", "port = 70000"))
                .reason
                .contains("out of range")
        );
        assert!(
            only_problem(&GOOD.replace("port = 80", "port = \"any\""))
                .reason
                .contains("neither a number")
        );
    }

    #[test]
    fn duplicate_vip_is_rejected() {
        let dup = format!(
            "{GOOD}\n[[vip]]\nname = \"web2\"\naddress = \"198.18.100.1\"\nprotocol = \"tcp\"\nport = \"all\"\nencap = \"gre\"\n"
        );
        let p = only_problem(&dup);
        assert_eq!(p.field, "vip[1]");
        assert!(p.reason.contains("duplicate VIP"), "{}", p.reason);
        // The same address with another protocol is a different VIP.
        assert!(
            Config::from_toml(
                &dup.replace(
                    "protocol = \"tcp\"\nport = \"all\"",
                    "protocol = \"udp\"\nport = \"all\""
                ),
                "t"
            )
            .is_ok()
        );
        let same_name = format!(
            "{GOOD}\n[[vip]]\nname = \"web\"\naddress = \"198.18.100.2\"\nprotocol = \"tcp\"\nport = 80\nencap = \"gre\"\n"
        );
        assert_eq!(only_problem(&same_name).field, "vip[1].name");
    }

    #[test]
    fn table_size_must_be_prime_and_large_enough() {
        let p =
            only_problem(&GOOD.replace("encap = \"ipip\"", "encap = \"ipip\"\ntable_size = 65536"));
        assert_eq!(p.field, "vip[0].table_size");
        assert!(
            p.reason.contains("not prime") && p.reason.contains("65537"),
            "{}",
            p.reason
        );
        let p = problems(&GOOD.replace("encap = \"ipip\"", "encap = \"ipip\"\ntable_size = 1"));
        assert!(p[0].reason.contains("out of range"), "{p:?}");
        assert!(p[1].reason.contains("fewer than the 2 backends"), "{p:?}");
        let small = GOOD
            .replace("encap = \"ipip\"", "encap = \"ipip\"\ntable_size = 1")
            .replace("table_size = 1", "table_size = 2")
            + "\n[[vip.backend]]\naddress = \"198.18.23.2\"\n";
        let p = only_problem(&small);
        assert!(
            p.reason.contains("fewer than the 3 backends"),
            "{}",
            p.reason
        );
    }

    #[test]
    fn backend_of_a_family_the_node_cannot_source_is_rejected() {
        let p =
            only_problem(&GOOD.replace("address = \"198.18.21.2\"", "address = \"2001:db8::21\""));
        assert_eq!(p.field, "vip[0].backend[0].address");
        assert!(
            p.reason.contains("node.address_v6 is not set"),
            "{}",
            p.reason
        );
        let with_v6 = GOOD
            .replace("address = \"198.18.21.2\"", "address = \"2001:db8::21\"")
            .replace(
                "address_v4 = \"198.18.11.2\"",
                "address_v4 = \"198.18.11.2\"\naddress_v6 = \"2001:db8::11\"",
            );
        assert!(Config::from_toml(&with_v6, "t").is_ok());
    }

    #[test]
    fn bad_backends_are_rejected() {
        let p = only_problem(&GOOD.replace("198.18.22.2", "198.18.21.2"));
        assert_eq!(p.field, "vip[0].backend[1].address");
        assert!(p.reason.contains("already listed"));
        let p = only_problem(&GOOD.replace("weight = 2", "weight = 70000"));
        assert_eq!(p.field, "vip[0].backend[1].weight");
        assert!(
            only_problem(&GOOD.replace("weight = 2", "weight = -1"))
                .reason
                .contains("invalid value")
        );
        assert!(
            only_problem(&GOOD.replace("198.18.22.2", "224.0.0.1"))
                .reason
                .contains("multicast")
        );
        let mapped = problems(&GOOD.replace("198.18.22.2", "::ffff:1.2.3.4"));
        assert!(
            mapped.iter().any(|p| p.reason.contains("IPv4-mapped")),
            "{mapped:?}"
        );
    }

    #[test]
    fn node_needs_a_source_address() {
        let p = problems(&GOOD.replace("address_v4 = \"198.18.11.2\"", ""));
        assert!(
            p.iter()
                .any(|p| p.field == "node" && p.reason.contains("address_v4")),
            "{p:?}"
        );
        assert!(
            only_problem(&GOOD.replace("address_v4 = \"198.18.11.2\"", "address_v4 = \"::1\""))
                .reason
                .contains("not an IPv4")
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let bad = GOOD
            .replace("weight = 2", "weight = 70000")
            .replace("port = 80", "port = 80\ntable_size = 100");
        assert_eq!(problems(&bad).len(), 2);
    }

    #[test]
    fn wrong_types_and_syntax_are_clear() {
        let p = only_problem(&GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""));
        assert_eq!(p.field, "vip[0].protocol");
        assert!(p.reason.contains("unknown variant `sctp`"), "{}", p.reason);
        let p = only_problem("[node\nname = 1");
        assert!(p.reason.contains("line 1"), "{}", p.reason);
        let p = only_problem(&GOOD.replace("198.18.100.1", "198.18.100"));
        assert_eq!(p.field, "vip[0].address");
        let p = only_problem(
            &GOOD
                .replace("version", "x")
                .replace("[node]", "version = 2\n[node]"),
        );
        assert_eq!(p.field, "version");
        assert!(only_problem("").reason.contains("missing field `node`"));
    }

    #[test]
    fn warnings_for_a_small_table_and_no_backends() {
        let c = Config::from_toml(
            &GOOD.replace("port = 80", "port = 80\ntable_size = 101"),
            "t",
        )
        .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1);
        assert!(w[0].reason.contains("consider 65537"), "{}", w[0].reason);
        assert_eq!(suggested_table_size(1000), 100_003);
    }

    #[test]
    fn unreadable_file_is_an_error_not_a_panic() {
        let e = Config::load("/nonexistent/lb.toml").unwrap_err();
        assert!(
            e.to_string()
                .contains("/nonexistent/lb.toml: cannot read the file")
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}") {
            let _ = Config::from_toml(&text, "fuzz.toml");
        }

        #[test]
        fn mutated_good_config_never_panics(at in 0usize..400, byte in proptest::prelude::any::<u8>()) {
            let mut bytes = GOOD.as_bytes().to_vec();
            let at = at % bytes.len();
            bytes[at] = byte;
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = Config::from_toml(text, "fuzz.toml");
            }
        }
    }
}
