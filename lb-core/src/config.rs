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
    /// Daisy chaining's budget of kernel socket lookups (sock_diag) per second, a token bucket
    /// holding one second's worth. A chaining candidate found in neither answer cache while the
    /// bucket is empty is dropped and counted (`lookup_budget`): a flood of spoofed non-SYN
    /// segments costs at most this many lookups a second.
    #[serde(default = "default_chain_lookups_per_second")]
    pub chain_lookups_per_second: u32,
    /// Daisy chaining's budget of packets sent on to a previous backend per second, a token
    /// bucket holding one second's worth. Beyond it, packets to chain are dropped and counted
    /// (`relay_budget`).
    #[serde(default = "default_chain_relays_per_second")]
    pub chain_relays_per_second: u32,
    /// Egress SNAT: destinations ("the Internet") whose connections from this host leave with a
    /// VIP as source. The agent steers them into its TUN by policy routing (table and priority
    /// 4242; IPv4: `from <address> to <prefix>`, IPv6: every local socket `to <prefix>` but
    /// those with a VIP as source). Empty: no egress SNAT from this host.
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
    /// The packet I/O the mux and the agent receive (and the mux sends) with.
    #[serde(default)]
    pub io: IoMode,
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
    /// The most memory this node's tables and connection tables may need, in MiB (see
    /// [`crate::budget`]): a config over it is refused. Default: half of the smallest of the
    /// host's memory, the process's cgroup limit and its address-space and data-size limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget_mb: Option<u64>,
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

/// Which `lb` process a config is for (`lb check-config --role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `lb mux`.
    Mux,
    /// `lb agent`.
    Agent,
    /// `lb healthcheck`.
    Healthcheck,
}

/// The packet I/O of `lb mux` and `lb agent` (`node.io`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoMode {
    /// AF_XDP where it attaches, else AF_PACKET; the fallback is logged with its reason.
    #[default]
    Auto,
    /// AF_XDP only: the process refuses to start when AF_XDP cannot attach.
    AfXdp,
    /// AF_PACKET rings in, raw IP sockets out.
    AfPacket,
}

impl IoMode {
    /// The name the config file uses.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::AfXdp => "af_xdp",
            Self::AfPacket => "af_packet",
        }
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
/// Default of `agent.chain_lookups_per_second`.
pub const DEFAULT_CHAIN_LOOKUPS_PER_SECOND: u32 = 2_000;
/// Default of `agent.chain_relays_per_second`.
pub const DEFAULT_CHAIN_RELAYS_PER_SECOND: u32 = 10_000;
fn default_chain_lookups_per_second() -> u32 {
    DEFAULT_CHAIN_LOOKUPS_PER_SECOND
}
fn default_chain_relays_per_second() -> u32 {
    DEFAULT_CHAIN_RELAYS_PER_SECOND
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
    /// Reads, parses and validates a config file (see [`read_config_file`] for what is read).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = read_config_text(path).map_err(|reason| ConfigError {
            file: path.to_owned(),
            problems: vec![Problem {
                field: String::new(),
                reason,
            }],
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates a config file's contents, read by [`read_config_file`] (the file
    /// watcher's); `origin` names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, origin: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let origin = origin.as_ref();
        let text = String::from_utf8(bytes).map_err(|e| ConfigError {
            file: origin.to_owned(),
            problems: vec![Problem {
                field: String::new(),
                reason: not_utf8(&e),
            }],
        })?;
        Self::from_toml(&text, origin)
    }

    /// Parses and validates config text; `origin` names it in errors.
    ///
    /// Every problem of the text is reported, not only the first: each unknown field and each
    /// value of the wrong type or out of its type's range is named with its line and column
    /// (the parser is run again without the offending key, up to [`MAX_PROBLEMS`] times), and
    /// then every rule of [`Config::validate`]. A syntax error stops the reading at once: what
    /// follows it cannot be read reliably.
    pub fn from_toml(text: &str, origin: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let origin = origin.as_ref();
        let fail = |problems| ConfigError {
            file: origin.to_owned(),
            problems,
        };
        let (config, mut problems, elements_removed) = deserialize_reporting_all(text);
        let Some(config) = config else {
            return Err(fail(problems));
        };
        // A config read around bad keys is validated too (its rules report what else is
        // wrong). Where array elements were taken out, only the rules of the sections that
        // stand alone: the others would name shifted indices, or miss what was taken out.
        if elements_removed {
            let mut fail = |field: String, reason: String| problems.push(Problem { field, reason });
            config.node.validate(&mut fail);
            if let Some(agent) = &config.agent {
                agent.validate(&mut fail);
            }
        } else {
            problems.extend(config.validate());
        }
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
            self.validate_agent_host(agent, &mut fail);
        }
        self.validate_snat(&mut fail);
        if let Some(healthcheck) = &self.healthcheck {
            healthcheck.validate_into(&self.vips, &mut fail);
            for (i, mux) in healthcheck.muxes.iter().enumerate() {
                if let Some(why) = socket_path_problem(mux) {
                    fail(
                        format!("healthcheck.muxes[{i}]"),
                        format!("the mux's control socket {why}"),
                    );
                }
            }
            let own = healthcheck.control_socket_path(&self.node.name);
            if let Some(why) = socket_path_problem(&own) {
                let field = if healthcheck.control_socket.is_some() {
                    "healthcheck.control_socket"
                } else {
                    "node.name"
                };
                fail(field.into(), format!("the sidecar's control socket {why}"));
            }
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
        self.validate_memory(&mut fail);
        problems
    }

    /// The memory the config needs on a mux ([`crate::budget::estimate`]) must fit the budget.
    fn validate_memory(&self, fail: &mut impl FnMut(String, String)) {
        use crate::budget::{MIB, mib};
        let (budget, field, whence) = match self.node.memory_budget_mb {
            Some(mb) => (
                Some(mb.saturating_mul(MIB)),
                "node.memory_budget_mb",
                "node.memory_budget_mb",
            ),
            None => (
                crate::budget::default_budget_bytes(),
                "node",
                "the default budget, half of this host's memory or of the process's memory limits; set node.memory_budget_mb to change it",
            ),
        };
        let Some(budget) = budget else { return };
        let need = crate::budget::estimate(self);
        if need.total_bytes() > budget {
            fail(
                field.into(),
                format!(
                    "this config needs about {} ({} of tables per snapshot x {} snapshots during a reload, {} of connection tables for {} workers), more than the {} budget ({whence}); use smaller table_size or conntrack_capacity, or fewer VIPs",
                    mib(need.total_bytes()),
                    mib(need.snapshot_bytes),
                    need.generations,
                    mib(need.conntrack_bytes),
                    need.workers,
                    mib(budget),
                ),
            );
        }
    }

    /// What `lb agent` needs of the rest of the file: this host (`node.address_v4/v6`) is a
    /// backend of some VIP (else it would receive nothing), every backend has its own chaining
    /// tag, and `agent.egress` has a `[[snat]]` address this host is a backend of.
    fn validate_agent_host(&self, agent: &AgentConfig, fail: &mut impl FnMut(String, String)) {
        let addresses: Vec<IpAddr> = [self.node.address_v4, self.node.address_v6]
            .into_iter()
            .flatten()
            .collect();
        let backends: std::collections::BTreeSet<IpAddr> = self
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.address))
            .collect();
        if !addresses.is_empty() && !addresses.iter().any(|a| backends.contains(a)) {
            let shown: Vec<String> = addresses.iter().map(ToString::to_string).collect();
            fail(
                "node".into(),
                format!(
                    "this host ({}) is a backend of no VIP: its agent would receive nothing (node.address_v4/address_v6 name the host's own address)",
                    shown.join(", ")
                ),
            );
        }
        let mut tags = BTreeMap::new();
        for &b in &backends {
            if let Some(other) = tags.insert(crate::snapshot::backend_tag(b), b) {
                fail(
                    "vip".into(),
                    format!(
                        "backends {other} and {b} have the same 32-bit tag: daisy chaining could not tell them apart; change one address"
                    ),
                );
            }
        }
        let snat_here = self.snats.iter().any(|snat| {
            let sharing = self.snat_backends(snat.address);
            addresses.iter().any(|a| sharing.contains(a))
        });
        if !agent.egress.is_empty() && !snat_here {
            fail(
                "agent.egress".into(),
                "egress SNAT needs a [[snat]] address that this host is a backend of: add one, or remove agent.egress".into(),
            );
        }
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

    /// What a process of `role` needs beyond [`Config::validate`] (the sections and settings
    /// it runs on); empty when it can run. `lb check-config --role` and each process at start
    /// use this one rule.
    #[must_use]
    pub fn role_problems(&self, role: Role) -> Vec<Problem> {
        let problem = |field: &str, reason: &str| Problem {
            field: field.into(),
            reason: reason.into(),
        };
        let mut problems = Vec::new();
        match role {
            Role::Mux => {
                if self.node.interface.is_none() {
                    problems.push(problem(
                        "node.interface",
                        "lb mux needs the interface that receives VIP traffic",
                    ));
                }
            }
            Role::Agent => {
                if self.node.interface.is_none() {
                    problems.push(problem(
                        "node.interface",
                        "lb agent needs the interface encapsulated packets arrive on",
                    ));
                }
                if self.agent.is_none() {
                    problems.push(problem("agent", "lb agent needs an [agent] section"));
                }
            }
            Role::Healthcheck => {
                if self.healthcheck.is_none() {
                    problems.push(problem(
                        "healthcheck",
                        "lb healthcheck needs a [healthcheck] section (an empty one publishes to this node's mux)",
                    ));
                }
            }
        }
        problems
    }

    /// [`Config::role_problems`] as a [`ConfigError`] naming `file`: Ok when a process of
    /// `role` can run on this config.
    pub fn check_role(&self, role: Role, file: &Path) -> Result<(), ConfigError> {
        let problems = self.role_problems(role);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                file: file.to_owned(),
                problems,
            })
        }
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
        if let Some(name) = &self.interface
            && let Some(why) = interface_name_problem(name)
        {
            fail("node.interface".into(), why);
        }
        if let Some(why) = socket_path_problem(&self.control_socket_path()) {
            let field = if self.control_socket.is_some() {
                "node.control_socket"
            } else {
                "node.name"
            };
            fail(field.into(), format!("the control socket {why}"));
        }
    }
}

/// Why `name` cannot name a network interface (Linux's rules: 1 to 15 bytes, not `.` or `..`,
/// no `/`, `:` or white space), or None.
#[must_use]
pub fn interface_name_problem(name: &str) -> Option<String> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    bad.then(|| {
        format!(
            "{name:?} is not a usable interface name (1 to 15 bytes, not \".\" or \"..\", no '/', ':' or white space)"
        )
    })
}

/// The longest path a Unix socket can be bound at: `sun_path` holds 108 bytes with the NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Why a control socket cannot be bound at `path`, or None.
#[must_use]
pub fn socket_path_problem(path: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt as _;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        Some("path is empty".into())
    } else if bytes.len() > MAX_SOCKET_PATH {
        Some(format!(
            "path {} is {} bytes; a Unix socket path has at most {MAX_SOCKET_PATH}",
            path.display(),
            bytes.len()
        ))
    } else if bytes.contains(&0) {
        Some("path contains a NUL byte".into())
    } else {
        None
    }
}

impl AgentConfig {
    fn validate(&self, fail: &mut impl FnMut(String, String)) {
        if let Some(why) = interface_name_problem(&self.tun) {
            fail("agent.tun".into(), why);
        }
        if self.muxes.is_empty() {
            fail(
                "agent.muxes".into(),
                "list the muxes' addresses or prefixes: encapsulated packets from anywhere else are dropped".into(),
            );
        }
        for (field, value) in [
            (
                "agent.chain_lookups_per_second",
                self.chain_lookups_per_second,
            ),
            (
                "agent.chain_relays_per_second",
                self.chain_relays_per_second,
            ),
        ] {
            if value == 0 {
                fail(
                    field.into(),
                    "must be at least 1 (to turn daisy chaining off, set agent.chaining = false)"
                        .into(),
                );
            }
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
    /// The port the service check probes on each backend's own address: `check.port`, or the
    /// VIP's port. None without a check (or, invalid, an all-ports VIP without `check.port`).
    /// The probe goes to the backend's address, not to the VIP: a server that listens on the
    /// VIP address only fails it.
    #[must_use]
    pub fn check_port(&self) -> Option<u16> {
        let check = self.check.as_ref()?;
        check.port.or(match self.port {
            PortSpec::Port(p) => Some(p),
            PortSpec::All => None,
        })
    }

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

/// The largest config file read, in bytes (16 MiB: about 200 000 backends). A larger file, or
/// one that grows past it while being read, is refused.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// At most this many problems are reported for one config text.
pub const MAX_PROBLEMS: usize = 100;

/// Reads a config file the way every `lb` process does, so that no path can wedge or exhaust
/// it: the path (after symbolic links) must be a regular file — a FIFO, a device such as
/// `/dev/zero`, a socket or a directory is refused before it is read — opened without blocking,
/// and at most [`MAX_CONFIG_BYTES`] long. The error says which rule failed, in words.
pub fn read_config_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let kind_of = |meta: &std::fs::Metadata| -> Option<&'static str> {
        use std::os::unix::fs::FileTypeExt as _;
        let t = meta.file_type();
        if t.is_file() {
            None
        } else if t.is_dir() {
            Some("a directory")
        } else if t.is_fifo() {
            Some("a FIFO")
        } else if t.is_char_device() || t.is_block_device() {
            Some("a device")
        } else if t.is_socket() {
            Some("a socket")
        } else {
            Some("not a regular file")
        }
    };
    let refuse = |what: &str| format!("cannot read the file: it is {what}, not a regular file");
    let too_big = |size: u64| {
        format!(
            "cannot read the file: {size} bytes is more than the {MAX_CONFIG_BYTES} a config may have"
        )
    };
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read the file: {e}"))?;
    if let Some(what) = kind_of(&meta) {
        return Err(refuse(what));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_big(meta.len()));
    }
    // O_NONBLOCK: if the path was swapped for a FIFO since the check, open does not wait for a
    // writer; the check below then refuses it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if let Some(what) = kind_of(&meta) {
        return Err(refuse(what));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the file: {e}"))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_config_file`], as UTF-8 text.
fn read_config_text(path: &Path) -> Result<String, String> {
    String::from_utf8(read_config_file(path)?).map_err(|e| not_utf8(&e))
}

fn not_utf8(e: &std::string::FromUtf8Error) -> String {
    format!(
        "the file is not UTF-8 text (byte {})",
        e.utf8_error().valid_up_to()
    )
}

/// One step of a field path: a key, or an index into an array.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// Renders steps as a field path (`vip[0].backend[1].weight`), as `serde_path_to_error` does.
fn path_text(steps: &[Step]) -> String {
    let mut s = String::new();
    for step in steps {
        match step {
            Step::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Step::Index(i) => {
                use fmt::Write as _;
                let _ = write!(s, "[{i}]");
            }
        }
    }
    s
}

type Spanned<'i> = toml::Spanned<toml::de::DeValue<'i>>;

/// The value at `steps` in `root`, to change it.
fn value_at<'a, 'i>(root: &'a mut Spanned<'i>, steps: &[Step]) -> Option<&'a mut Spanned<'i>> {
    let mut at = root;
    for step in steps {
        at = match (at.get_mut(), step) {
            (toml::de::DeValue::Table(t), Step::Key(k)) => t.get_mut(k.as_str())?,
            (toml::de::DeValue::Array(a), Step::Index(i)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(at)
}

/// Deserializes `text` into a [`Config`], reporting every unknown field and every value of the
/// wrong type, not only the first: after each error the offending key is taken out and the
/// rest read again. A required field that is missing (or was taken out) cannot be read around,
/// so its whole array element (a `[[vip]]`, a `[[vip.backend]]`) is taken out instead; field
/// paths keep naming the file's own indices. Returns the config as read (around the bad keys,
/// None if it could not be read at all), the problems in the file's order, and whether array
/// elements were taken out.
fn deserialize_reporting_all(text: &str) -> (Option<Config>, Vec<Problem>, bool) {
    let root = match toml::de::DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => return (None, vec![parse_problem(text, "", &e)], false),
    };
    let span = root.span();
    let mut work: Spanned<'_> =
        toml::Spanned::new(span, toml::de::DeValue::Table(root.into_inner()));
    let mut problems = Vec::new();
    // Keys taken out, by the file's path: a "missing field" they cause is no news.
    let mut removed: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    // Per array (by the file's path), the file's index of each element still in `work`.
    let mut kept: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut elements_removed = false;
    for _ in 0..MAX_PROBLEMS {
        let de = toml::de::ValueDeserializer::from(work.clone());
        let error = match serde_path_to_error::deserialize::<_, Config>(de) {
            Ok(config) => {
                problems.sort_by_key(|(at, _)| *at);
                let problems = problems.into_iter().map(|(_, p)| p).collect();
                return (Some(config), problems, elements_removed);
            }
            Err(e) => e,
        };
        // The path in `work` and the same path in the file.
        let mut here = Vec::new();
        let mut file_path = Vec::new();
        for segment in error.path() {
            match segment {
                serde_path_to_error::Segment::Map { key } => {
                    here.push(Step::Key(key.clone()));
                    file_path.push(Step::Key(key.clone()));
                }
                serde_path_to_error::Segment::Seq { index } => {
                    let original = kept
                        .get(&path_text(&file_path))
                        .and_then(|k| k.get(*index).copied())
                        .unwrap_or(*index);
                    here.push(Step::Index(*index));
                    file_path.push(Step::Index(original));
                }
                serde_path_to_error::Segment::Enum { .. }
                | serde_path_to_error::Segment::Unknown => {}
            }
        }
        let message = error.inner().message();
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
            .map(|field| {
                let mut p = file_path.clone();
                p.push(Step::Key(field.to_owned()));
                path_text(&p)
            });
        if !missing.as_ref().is_some_and(|m| removed.contains(m)) {
            let at = error.inner().span().map_or(usize::MAX, |s| s.start);
            problems.push((
                at,
                parse_problem(text, &path_text(&file_path), error.inner()),
            ));
        }
        // Take out the key, or else the innermost array element on the path.
        if missing.is_none()
            && let Some((Step::Key(key), parent)) = here.split_last()
            && let Some(toml::de::DeValue::Table(table)) =
                value_at(&mut work, parent).map(toml::Spanned::get_mut)
            && table.remove(key.as_str()).is_some()
        {
            removed.insert(path_text(&file_path));
            continue;
        }
        let Some(cut) = here.iter().rposition(|s| matches!(s, Step::Index(_))) else {
            break;
        };
        let Step::Index(index) = here[cut] else { break };
        let array_path = path_text(&file_path[..cut]);
        let Some(toml::de::DeValue::Array(array)) =
            value_at(&mut work, &here[..cut]).map(toml::Spanned::get_mut)
        else {
            break;
        };
        let len = array.len();
        let mut rebuilt = toml::de::DeArray::new();
        for (i, item) in array.iter().enumerate() {
            if i != index {
                rebuilt.push(item.clone());
            }
        }
        *array = rebuilt;
        let indices = kept.entry(array_path).or_insert_with(|| (0..len).collect());
        if index < indices.len() {
            indices.remove(index);
        }
        elements_removed = true;
    }
    // In the file's order.
    problems.sort_by_key(|(at, _)| *at);
    (
        None,
        problems.into_iter().map(|(_, p)| p).collect(),
        elements_removed,
    )
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
            "{}\n[agent]\nmuxes = [\"198.18.11.0/24\"]\n[[snat]]\naddress = \"198.18.100.1\"\n",
            GOOD.replace("198.18.11.2", "198.18.21.2")
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
        assert_eq!(
            (a.chain_lookups_per_second, a.chain_relays_per_second),
            (
                DEFAULT_CHAIN_LOOKUPS_PER_SECOND,
                DEFAULT_CHAIN_RELAYS_PER_SECOND
            )
        );
        let p = only_problem(&agent.replace(
            "[\"198.18.11.0/24\"]\n",
            "[\"198.18.11.0/24\"]\nchain_relays_per_second = 0\n",
        ));
        assert_eq!(p.field, "agent.chain_relays_per_second");
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
    fn what_the_agent_refuses_check_config_refuses() {
        let agent_host = GOOD.replace("198.18.11.2", "198.18.21.2");
        let agent = format!("{agent_host}\n[agent]\nmuxes = [\"198.18.11.0/24\"]\n");
        assert!(Config::from_toml(&agent, "t").is_ok());
        // Not a backend: the agent would receive nothing.
        let p = only_problem(&agent.replace(
            "address_v4 = \"198.18.21.2\"",
            "address_v4 = \"198.18.21.9\"",
        ));
        assert_eq!(p.field, "node");
        assert!(p.reason.contains("backend of no VIP"), "{p}");
        // Egress SNAT without a [[snat]] address this host shares.
        let p =
            only_problem(&agent.replace("[agent]\n", "[agent]\negress = [\"198.18.200.0/24\"]\n"));
        assert_eq!(p.field, "agent.egress");
        let with_snat = format!(
            "{}[[snat]]\naddress = \"198.18.100.1\"\n",
            agent.replace("[agent]\n", "[agent]\negress = [\"198.18.200.0/24\"]\n")
        );
        assert!(Config::from_toml(&with_snat, "t").is_ok());
    }

    #[test]
    fn interface_and_socket_names_the_nodes_refuse_are_refused() {
        for bad in ["", "a-very-long-interface", "../eth0", "eth 0", ".", "a:b"] {
            let text = GOOD.replace("[node]\n", &format!("[node]\ninterface = {bad:?}\n"));
            let p = only_problem(&text);
            assert_eq!(p.field, "node.interface", "{bad:?}: {p}");
        }
        let ok = GOOD.replace("[node]\n", "[node]\ninterface = \"veth-mux1.100\"\n");
        assert!(Config::from_toml(&ok, "t").is_ok());
        let tun = format!(
            "{}\n[agent]\nmuxes = [\"198.18.11.0/24\"]\ntun = \"a/b\"\n",
            GOOD.replace("198.18.11.2", "198.18.21.2")
        );
        assert_eq!(only_problem(&tun).field, "agent.tun");
        // A node name that makes /run/lb/<name>.sock longer than a socket path can be.
        let long = "n".repeat(100);
        let p = only_problem(&GOOD.replace("name = \"mux1\"", &format!("name = \"{long}\"")));
        assert_eq!(p.field, "node.name");
        assert!(p.reason.contains("at most 107"), "{p}");
        let p = only_problem(&GOOD.replace(
            "[node]\n",
            &format!("[node]\ncontrol_socket = \"/run/{long}/x.sock\"\n"),
        ));
        assert_eq!(p.field, "node.control_socket");
        // The sidecar's mux list.
        let p = only_problem(&format!("{GOOD}\n[healthcheck]\nmuxes = [\"\"]\n"));
        assert_eq!(p.field, "healthcheck.muxes[0]");
        assert!(p.reason.contains("empty"), "{p}");
    }

    #[test]
    fn every_type_and_unknown_field_error_is_reported_with_its_place() {
        let bad = GOOD
            .replace("weight = 2", "wieght = 2")
            .replace("protocol = \"tcp\"", "protocol = \"sctp\"")
            .replace("name = \"mux1\"", "name = \"mux1\"\nbogus = 1");
        let found = problems(&bad);
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["node.bogus", "vip[0].protocol", "vip[0].backend[1].wieght"],
            "{found:?}"
        );
        assert!(
            found.iter().all(|p| p.reason.contains("line ")),
            "{found:?}"
        );
        // An unknown field and a rule broken elsewhere: both.
        let mixed = GOOD
            .replace("weight = 2", "wieght = 2")
            .replace("port = 80", "port = 80\ntable_size = 100");
        let fields: Vec<String> = problems(&mixed).into_iter().map(|p| p.field).collect();
        assert_eq!(fields, ["vip[0].backend[1].wieght", "vip[0].table_size"]);
        // A bad required field takes its element out: later elements keep their own indices.
        let two = format!(
            "{}\n[[vip]]\nname = \"b\"\naddress = \"198.18.100.2\"\nprotocol = \"udp\"\nport = \"x\"\n[[vip.backend]]\naddress = \"198.18.21.2\"\nbad = true\n",
            GOOD.replace("198.18.100.1", "198.18.100")
        );
        let found = problems(&two);
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["vip[0].address", "vip[1].port", "vip[1].backend[0].bad"],
            "{found:?}"
        );
    }

    #[test]
    fn a_config_over_the_memory_budget_is_refused_with_the_figures() {
        let big = GOOD
            .replace(
                "encap = \"ipip\"",
                "encap = \"ipip\"\ntable_size = 16777213",
            )
            .replace("[node]\n", "[node]\nmemory_budget_mb = 64\n");
        let p = only_problem(&big);
        assert_eq!(p.field, "node.memory_budget_mb");
        assert!(p.reason.contains("needs about"), "{p}");
        let roomy = big.replace("memory_budget_mb = 64", "memory_budget_mb = 4096");
        let c = Config::from_toml(&roomy, "t").unwrap();
        let need = crate::budget::estimate(&c);
        assert!(need.total_bytes() > 2 * 16_777_213 * 2, "{need:?}");
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
