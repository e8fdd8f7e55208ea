//! `lb`: the command-line entry point. Parses arguments (clap) and dispatches to the commands in
//! the `lb` library; all logic lives there or in `lb-core`.

use std::io::{self, IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lb::{bench, forward_bench, lab, status, table};
use lb_core::config::Config;
use lb_dataplane::agent_run;
use lb_dataplane::control::Request;
use lb_dataplane::mux;
use lb_dataplane::process::RunOptions;
use lb_dataplane::socket::request;
use lb_healthcheck::sidecar;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "Maglev-style software L4 load balancer and NAT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `lb check-config --role`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum RoleArg {
    Mux,
    Agent,
    Healthcheck,
}

impl From<RoleArg> for lb_core::config::Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Mux => Self::Mux,
            RoleArg::Agent => Self::Agent,
            RoleArg::Healthcheck => Self::Healthcheck,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Validate config files: prints "ok" (and any warnings) or every error, exits 1 on errors.
    CheckConfig {
        /// Also check what this process needs to run on the file (mux: node.interface; agent:
        /// node.interface and [agent]; healthcheck: [healthcheck]).
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
        /// Config files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show each VIP's Maglev table: slots and share per backend, balance, fingerprint.
    Table(TableArgs),
    /// Benchmarks for operators.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Run a mux node: receive VIP traffic on node.interface and encapsulate it to the backends.
    /// Reloads on SIGHUP, on a change of the file, and on `lb ctl reload`; stops on SIGTERM.
    Mux(RunArgs),
    /// Run the backend agent: decapsulate what the muxes send, deliver it through a TUN (the
    /// VIP is on lo, replies go straight to the router), chain packets of moved connections on.
    Agent(RunArgs),
    /// Run the health-check sidecar next to a mux: probe every backend (service and agent),
    /// push health to the muxes' control sockets, announce or withdraw the VIPs by BGP
    /// (ExaBGP: run it as ExaBGP's API process; BIRD: through birdc). Stops on SIGTERM, after
    /// withdrawing.
    Healthcheck(RunArgs),
    /// Show a running node's state (mux, agent or health-check sidecar): generation, table
    /// fingerprints, backends, health, counters.
    Status {
        #[command(flatten)]
        socket: SocketArgs,
        /// Print the JSON answer instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The fleet lab, in network namespaces on this machine (root): build it, remove it, see it.
    Lab {
        #[command(subcommand)]
        what: LabCommand,
    },
    /// Change a running node: drain, undrain, set health, reload. Prints what changed and the
    /// generation now in force.
    Ctl {
        #[command(flatten)]
        socket: SocketArgs,
        /// Print the node's JSON answer instead of text.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        what: CtlCommand,
    },
}

/// The options of the long-running commands (mux, agent, healthcheck).
#[derive(Args)]
struct RunArgs {
    /// The config file (the agent's needs an [agent] section, the sidecar's a [healthcheck]
    /// section).
    #[arg(long)]
    config: PathBuf,
    /// The control socket (default: node.control_socket, or /run/lb/<node name>.sock; for the
    /// sidecar healthcheck.control_socket, or /run/lb/<node name>-healthcheck.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Where the Prometheus exporter listens (default: node.metrics_address; for the sidecar
    /// healthcheck.metrics_address).
    #[arg(long, conflicts_with = "no_metrics")]
    metrics: Option<SocketAddr>,
    /// Do not start the Prometheus exporter.
    #[arg(long)]
    no_metrics: bool,
}

impl From<RunArgs> for RunOptions {
    fn from(a: RunArgs) -> Self {
        Self {
            config: a.config,
            control_socket: a.socket,
            metrics_address: a.metrics,
            no_metrics: a.no_metrics,
        }
    }
}

#[derive(Args)]
struct SocketArgs {
    /// The node's control socket.
    #[arg(long, conflicts_with = "config")]
    socket: Option<PathBuf>,
    /// Find the control socket in this config file instead.
    #[arg(long)]
    config: Option<PathBuf>,
    /// With --config: the health-check sidecar's socket (healthcheck.control_socket), not the node's.
    #[arg(long, requires = "config")]
    healthcheck: bool,
}

impl SocketArgs {
    fn path(&self) -> anyhow::Result<PathBuf> {
        Ok(match (&self.socket, &self.config) {
            (Some(s), _) => s.clone(),
            (None, Some(c)) => {
                let config = Config::load(c)?;
                if self.healthcheck {
                    let section = config.healthcheck.as_ref().ok_or_else(|| {
                        anyhow::anyhow!("{}: no [healthcheck] section", c.display())
                    })?;
                    section.control_socket_path(&config.node.name)
                } else {
                    config.node.control_socket_path()
                }
            }
            (None, None) => PathBuf::from("/run/lb/lb.sock"),
        })
    }
}

/// Where a persistent lab named `name` keeps its files; the name is 1 to 12 ASCII letters and
/// digits (it goes into namespace and path names).
fn lab_dir(name: &str) -> anyhow::Result<PathBuf> {
    if name.is_empty() || name.len() > 12 || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
        anyhow::bail!("lab name {name:?}: use 1 to 12 ASCII letters and digits");
    }
    Ok(PathBuf::from("/run/lb-lab").join(name))
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the fleet and leave it running: client, router, muxes (lb mux + lb healthcheck),
    /// backends (lb agent + a server), an internet host. Does nothing if it is already up.
    Up(LabArgs),
    /// Remove everything `up` made: its processes (by pid), namespaces and files.
    Down {
        /// The lab's name.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Show the lab: route, muxes (generation, fingerprints), backends.
    Status {
        /// The lab's name.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// The main job: a temporary lab, live traffic per mux and per backend, every resilience
    /// experiment with its figures, then the lab is removed.
    Demo {
        /// Seconds of live traffic view before the experiments.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=60))]
        seconds: u64,
        /// How the router spreads the VIP over the muxes.
        #[arg(long, value_enum, default_value_t = RoutingArg::Multipath)]
        routing: RoutingArg,
    },
    /// Run one resilience experiment (or `all`) on a temporary lab and print its figures.
    Experiment {
        /// mux-dies, mux-added, backend-added, backend-drained, backend-dies, reloads,
        /// snat-egress, or all.
        name: String,
        /// How the router spreads the VIP over the muxes.
        #[arg(long, value_enum, default_value_t = RoutingArg::Multipath)]
        routing: RoutingArg,
        /// Turn daisy chaining off (to see what it prevents).
        #[arg(long)]
        no_chaining: bool,
        /// Write the results table (Markdown) to this file, e.g. RESULTS.md.
        #[arg(long)]
        results: Option<PathBuf>,
    },
    /// One HTTP request from the current namespace (e.g. `ip netns exec lbl-default-client lb
    /// lab get`): prints the answer, the name of the backend that served it.
    Get {
        /// Where to send it.
        #[arg(default_value = "198.18.100.1:80")]
        to: SocketAddr,
    },
    /// A backend's server in the lab: HTTP (answers its name) and UDP echo.
    #[command(hide = true)]
    Serve {
        /// The name it answers.
        #[arg(long)]
        name: String,
        /// HTTP address.
        #[arg(long)]
        http: SocketAddr,
        /// UDP echo address.
        #[arg(long)]
        udp: SocketAddr,
    },
}

#[derive(Args)]
struct LabArgs {
    /// The lab's name (namespaces lbl-NAME-*, files in /run/lb-lab/NAME).
    #[arg(long, default_value = "default")]
    name: String,
    /// Muxes serving from the start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=8))]
    muxes: u8,
    /// Backends serving from the start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=8))]
    backends: u8,
    /// How the router spreads the VIP over the muxes.
    #[arg(long, value_enum, default_value_t = RoutingArg::Multipath)]
    routing: RoutingArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoutingArg {
    /// A static multipath route.
    Multipath,
    /// A static resilient nexthop group.
    Resilient,
    /// BGP: BIRD 2 on the router, a BIRD speaker per mux driven by its lb healthcheck.
    Bgp,
}

impl RoutingArg {
    fn routing(self) -> lab::live::Routing {
        match self {
            RoutingArg::Multipath => lab::live::Routing::Multipath,
            RoutingArg::Resilient => lab::live::Routing::Resilient,
            RoutingArg::Bgp => lab::live::Routing::Bgp,
        }
    }
}

impl LabArgs {
    fn plan(&self) -> lab::live::LabPlan {
        lab::live::LabPlan {
            muxes: usize::from(self.muxes),
            backends: usize::from(self.backends),
            routing: self.routing.routing(),
            ..lab::live::LabPlan::default()
        }
    }
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Weight 0 for a backend: no new flows; tracked flows continue.
    Drain {
        /// The backend's address.
        backend: IpAddr,
        /// Only this VIP (default: every VIP with the backend).
        #[arg(long)]
        vip: Option<String>,
    },
    /// Give a drained backend its weight back.
    Undrain {
        /// The backend's address.
        backend: IpAddr,
        /// Only this VIP (default: every VIP with the backend).
        #[arg(long)]
        vip: Option<String>,
    },
    /// Mark a backend healthy or unhealthy (an unhealthy one leaves the table).
    SetHealth {
        /// The backend's address.
        backend: IpAddr,
        /// `healthy` or `unhealthy`.
        #[arg(value_parser = ["healthy", "unhealthy"])]
        state: String,
        /// Only this VIP (default: every VIP with the backend).
        #[arg(long)]
        vip: Option<String>,
    },
    /// Read the config file again.
    Reload,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct TableArgs {
    #[command(subcommand)]
    diff: Option<TableCommand>,
    /// The config file.
    #[arg(required = true)]
    config: Option<PathBuf>,
    /// Only this VIP (by name).
    #[arg(long)]
    vip: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum TableCommand {
    /// Compare two configs: per VIP, the share of new flows that move and who gains and loses.
    Diff {
        /// The config in force.
        old: PathBuf,
        /// The config to compare it with.
        new: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Maglev table build and lookup times, balance and disruption, against the maglev-hash crate.
    Table {
        /// Fewer runs per case (under 30 seconds).
        #[arg(long)]
        quick: bool,
        /// One JSON object per case, then a summary object with the ratios.
        #[arg(long)]
        json: bool,
    },
    /// Packets per second delivered through `lb mux` (AF_PACKET and AF_XDP, 1 and 2 workers)
    /// against the kernel's own IP forwarding, with the mux's CPU time per packet and its
    /// kernel drops, on veth in network namespaces the benchmark creates (root).
    Forward(ForwardArgs),
    /// TCP throughput (iperf3) from a client to the VIP through `lb mux` and `lb agent`,
    /// against the kernel's forwarding over the same hops, in the lab's fleet (root).
    Tcp(TcpArgs),
}

#[derive(Args)]
struct TcpArgs {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Rounds of every case (they alternate).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Parallel TCP streams per run (iperf3 -P).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    streams: u8,
    /// The cases, in the order each round runs them: kernel, lb (mux and agent on the build's
    /// default I/O), lb_af_packet, lb_af_xdp (both with that node.io).
    #[arg(long, value_delimiter = ',', default_value = "kernel,lb")]
    cases: Vec<lb::tcp_bench::TcpCase>,
    /// One JSON object per case, one per line, instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ForwardArgs {
    /// Seconds per sender run.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds of every case (they alternate).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Distinct flows (UDP source ports).
    #[arg(long, default_value_t = 1024, conflicts_with = "new_flows")]
    flows: u16,
    /// Send TCP SYNs of a new 5-tuple each (a SYN flood's new-flow rate) instead of steady flows.
    #[arg(long)]
    new_flows: bool,
    /// The cases, in the order each round runs them: kernel, af_packet, af_xdp.
    #[arg(long, value_delimiter = ',', default_value = "kernel,af_packet,af_xdp")]
    cases: Vec<forward_bench::Forwarder>,
    /// Worker counts of every mux case.
    #[arg(long, value_delimiter = ',', default_value = "1,2",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: Vec<u16>,
    /// The sender: auto (AF_XDP when it opens, else AF_PACKET), af_xdp, af_packet.
    #[arg(long, value_enum, default_value_t = SenderArg::Auto)]
    sender: SenderArg,
    /// Sender threads, one per transmit queue of the sender's veth (1 or 2), in every case
    /// (default: per case, 2 for the kernel, one per worker for a mux).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    sender_threads: Option<u8>,
    /// Cap the sender at this many frames per second (all threads together).
    #[arg(long)]
    pps: Option<u64>,
    /// One JSON object per case, one per line, instead of the table.
    #[arg(long)]
    json: bool,
}

/// `lb bench forward --sender`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
enum SenderArg {
    Auto,
    AfXdp,
    AfPacket,
}

/// What `lb check-config` says of a valid config besides "ok": the memory it needs on a mux,
/// and where each VIP's health checks go.
fn describe_config(config: &Config, file: &std::path::Path, out: &mut dyn Write) -> io::Result<()> {
    use lb_core::budget::{self, mib};
    let need = budget::estimate(config);
    let budget_text = match config.node.memory_budget_mb {
        Some(mb) => format!("node.memory_budget_mb {mb} MiB"),
        None => budget::default_budget_bytes().map_or_else(
            || "no budget (host memory unknown)".to_owned(),
            |b| format!("default budget {} (half of this host's memory or of this process's memory limits)", mib(b)),
        ),
    };
    writeln!(
        out,
        "{}: memory: about {} on a mux ({} of tables per snapshot x {} during a reload, {} of connection tables for {} workers); {budget_text}",
        file.display(),
        mib(need.total_bytes()),
        mib(need.snapshot_bytes),
        need.generations,
        mib(need.conntrack_bytes),
        need.workers,
    )?;
    for vip in &config.vips {
        let (Some(check), Some(port)) = (&vip.check, vip.check_port()) else {
            continue;
        };
        let targets: Vec<String> = vip
            .backends
            .iter()
            .map(|b| SocketAddr::new(b.address, port).to_string())
            .collect();
        writeln!(
            out,
            "{}: VIP {}: {} checks probe each backend's own address, not the VIP: {} (a server listening on {} only fails them)",
            file.display(),
            vip.name,
            check.kind.type_name(),
            targets.join(", "),
            vip.address,
        )?;
    }
    Ok(())
}

fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { role, files } => {
            let mut failed = false;
            for file in &files {
                let loaded = Config::load(file).and_then(|config| match role {
                    Some(role) => config.check_role(role.into(), file).map(|()| config),
                    None => Ok(config),
                });
                match loaded {
                    Ok(config) => {
                        for w in config.warnings() {
                            writeln!(out, "{}: warning: {w}", file.display())?;
                        }
                        describe_config(&config, file, out)?;
                        writeln!(out, "{}: ok", file.display())?;
                    }
                    Err(e) => {
                        failed = true;
                        writeln!(out, "{e}")?;
                    }
                }
            }
            return Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
        Command::Table(TableArgs {
            diff: Some(TableCommand::Diff { old, new, json }),
            ..
        }) => {
            table::diff(&Config::load(&old)?, &Config::load(&new)?, json, out)?;
        }
        Command::Table(TableArgs {
            diff: None,
            config,
            vip,
            json,
        }) => {
            let config = config.expect("clap requires CONFIG without a subcommand");
            table::show(&Config::load(&config)?, vip.as_deref(), json, out)?;
        }
        Command::Bench {
            what: BenchCommand::Table { quick, json },
        } => {
            let plan = if quick {
                bench::Plan::QUICK
            } else {
                bench::Plan::FULL
            };
            let (results, summary) = bench::run(&plan)?;
            if json {
                bench::write_json(&results, &summary, out)?;
            } else {
                bench::write_text(&results, &summary, out)?;
            }
        }
        Command::Bench {
            what: BenchCommand::Forward(args),
        } => {
            let plan = forward_bench::ForwardPlan {
                duration: std::time::Duration::from_secs_f64(args.seconds.clamp(0.1, 60.0)),
                rounds: args.rounds.clamp(1, 20),
                traffic: if args.new_flows {
                    lb::blast::Traffic::NewFlows
                } else {
                    lb::blast::Traffic::Flows(args.flows)
                },
                forwarders: args.cases,
                workers: args.workers.into_iter().map(usize::from).collect(),
                sender: match args.sender {
                    SenderArg::Auto => forward_bench::SenderChoice::Auto,
                    SenderArg::AfXdp => forward_bench::SenderChoice::AfXdp,
                    SenderArg::AfPacket => forward_bench::SenderChoice::AfPacket,
                },
                sender_threads: args.sender_threads.map(usize::from),
                pps: args.pps,
            };
            lb::netns::remove_labs_on_signal()?;
            let lb = std::env::current_exe()?;
            let cases = forward_bench::run(&plan, &lb, &mut |line| eprintln!("{line}"))?;
            if args.json {
                forward_bench::write_json(&cases, out)?;
            } else {
                write!(out, "{}", forward_bench::table(&cases))?;
            }
        }
        Command::Bench {
            what: BenchCommand::Tcp(args),
        } => {
            let plan = lb::tcp_bench::TcpPlan {
                duration: std::time::Duration::from_secs_f64(args.seconds.clamp(1.0, 120.0)),
                rounds: args.rounds.clamp(1, 20),
                streams: usize::from(args.streams),
                cases: args.cases,
            };
            lb::netns::remove_labs_on_signal()?;
            let lb = std::env::current_exe()?;
            let cases = lb::tcp_bench::run(&plan, &lb, &mut |line| eprintln!("{line}"))?;
            if args.json {
                lb::tcp_bench::write_json(&cases, out)?;
            } else {
                write!(out, "{}", lb::tcp_bench::table(&cases))?;
            }
        }
        Command::Mux(args) => {
            init_logs();
            mux::run(&args.into()).map_err(|e| anyhow::anyhow!(e))?;
        }
        Command::Agent(args) => {
            init_logs();
            agent_run::run(&args.into()).map_err(|e| anyhow::anyhow!(e))?;
        }
        Command::Healthcheck(args) => {
            init_logs();
            sidecar::run(&args.into()).map_err(|e| anyhow::anyhow!(e))?;
        }
        Command::Status { socket, json } => {
            let answer = request(&socket.path()?, &json!({"command": "status"}))?;
            if json {
                writeln!(out, "{answer:#}")?;
            } else if answer["ok"] == true {
                write!(out, "{}", status::render(&answer))?;
            } else {
                anyhow::bail!("{}", answer["error"].as_str().unwrap_or("the node refused"));
            }
            if answer["ok"] != true {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Lab { what } => {
            lb::topology::lab_io().map_err(anyhow::Error::msg)?;
            return run_lab(what, out);
        }
        Command::Ctl { socket, json, what } => {
            let req = match what {
                CtlCommand::Drain { backend, vip } => Request::Drain { backend, vip },
                CtlCommand::Undrain { backend, vip } => Request::Undrain { backend, vip },
                CtlCommand::SetHealth {
                    backend,
                    state,
                    vip,
                } => Request::SetHealth {
                    backend,
                    vip,
                    healthy: state == "healthy",
                },
                CtlCommand::Reload => Request::Reload,
            };
            let answer = request(&socket.path()?, &serde_json::to_value(&req)?)?;
            if json {
                writeln!(out, "{answer}")?;
            } else if answer["ok"] == true {
                write!(out, "{}", status::render_ctl(&req, &answer))?;
            } else {
                anyhow::bail!("{}", answer["error"].as_str().unwrap_or("the node refused"));
            }
            if answer["ok"] != true {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_lab(what: LabCommand, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    use lab::live::LiveLab;
    // The lab's own log lines only when asked for: the output is the figures.
    if std::env::var_os("RUST_LOG").is_some() && !matches!(what, LabCommand::Serve { .. }) {
        init_logs();
    }
    match what {
        LabCommand::Up(args) => {
            lb::netns::require_root("lb lab up");
            let dir = lab_dir(&args.name)?;
            if let Some(live) = LiveLab::peek(&dir)? {
                writeln!(
                    out,
                    "lab {} is already up (with the settings it was built with; `lb lab down --name {}` first to change them)\n{}",
                    args.name,
                    args.name,
                    live.summary()
                )?;
                return Ok(ExitCode::SUCCESS);
            }
            if LiveLab::interrupted(&dir) {
                anyhow::bail!(
                    "an earlier `lb lab up --name {}` was interrupted: remove what it built with `lb lab down --name {}`",
                    args.name,
                    args.name
                );
            }
            let started = std::time::Instant::now();
            let lab = lb::netns::Lab::persistent(&args.name, &dir)?;
            let live = LiveLab::up(lab, args.plan())?;
            let summary = live.summary();
            // Recorded before anything is printed: a closed pipe must not take the lab down.
            live.save()?;
            write!(out, "{summary}")?;
            writeln!(
                out,
                "up in {:.1} s; logs, configs and sockets in {}",
                started.elapsed().as_secs_f64(),
                dir.display()
            )?;
        }
        LabCommand::Down { name } => {
            lb::netns::require_root("lb lab down");
            let dir = lab_dir(&name)?;
            if LiveLab::down(&dir)? {
                writeln!(out, "lab {name} removed")?;
            } else {
                writeln!(out, "lab {name} is not up")?;
            }
        }
        LabCommand::Demo { seconds, routing } => {
            lb::netns::require_root("lb lab demo");
            lb::netns::remove_labs_on_signal()?;
            let plan = lab::live::LabPlan {
                routing: routing.routing(),
                ..lab::live::LabPlan::default()
            };
            let outcomes = lab::demo::run(plan, seconds, &lab::experiment::ALL, out)?;
            write!(out, "\n{}", lab::experiment::results_table(&outcomes))?;
            if outcomes.iter().any(|o| !o.passed) {
                return Ok(ExitCode::FAILURE);
            }
        }
        LabCommand::Get { to } => {
            writeln!(out, "{}", lab::traffic::http_get(to, "/")?)?;
        }
        LabCommand::Experiment {
            name,
            routing,
            no_chaining,
            results,
        } => {
            let names: Vec<&str> = if name == "all" {
                lab::experiment::ALL.to_vec()
            } else if lab::experiment::ALL.contains(&name.as_str()) {
                vec![name.as_str()]
            } else {
                anyhow::bail!(
                    "no experiment {name:?}; there are: {}, all",
                    lab::experiment::ALL.join(", ")
                );
            };
            lb::netns::require_root("lb lab experiment");
            lb::netns::remove_labs_on_signal()?;
            let plan = lab::live::LabPlan {
                routing: routing.routing(),
                chaining: !no_chaining,
                ..lab::live::LabPlan::default()
            };
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let mut outcomes = lab::demo::run(plan.clone(), 0, &names, out)?;
            if name == "all" && !no_chaining {
                // The control: the same case with chaining off must break connections.
                let control = lab::live::LabPlan {
                    chaining: false,
                    ..plan
                };
                for o in lab::demo::run(control, 0, &["backend-added"], out)? {
                    let o = lab::experiment::as_control(o);
                    writeln!(out, "{}", o.line())?;
                    outcomes.push(o);
                }
            }
            let table = lab::experiment::results_table(&outcomes);
            write!(out, "\n{table}")?;
            if let Some(path) = results {
                std::fs::write(
                    &path,
                    lab::experiment::results_document(&outcomes, &command),
                )?;
                writeln!(out, "results written to {}", path.display())?;
            }
            if outcomes.iter().any(|o| !o.passed) {
                return Ok(ExitCode::FAILURE);
            }
        }
        LabCommand::Serve { name, http, udp } => {
            init_logs();
            lab::server::serve_forever(&name, http, udp)?;
        }
        LabCommand::Status { name } => {
            let dir = lab_dir(&name)?;
            // A look only: the lab stays as it is whatever happens here.
            match LiveLab::peek(&dir)? {
                Some(live) => write!(out, "{}", live.summary())?,
                None => {
                    writeln!(out, "lab {name} is not up")?;
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Structured logs on stderr; the level from `RUST_LOG` (default `info`). Colours only when
/// stderr is a terminal: a log file or a journal gets plain text.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = io::stdout().lock();
    match run(cli, &mut out).and_then(|code| Ok(out.flush().map(|()| code)?)) {
        Ok(code) => code,
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
