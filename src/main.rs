//! `lb`: the command-line entry point. Parses arguments (clap) and dispatches to the commands in
//! the `lb` library; all logic lives there or in `lb-core`.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lb::{bench, forward_bench, table};
use lb_core::config::Config;
use lb_dataplane::agent_run;
use lb_dataplane::control::render_status;
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

#[derive(Subcommand)]
enum Command {
    /// Validate config files: prints "ok" (and any warnings) or every error, exits 1 on errors.
    CheckConfig {
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
    /// Change a running node: drain, undrain, set health, reload.
    Ctl {
        #[command(flatten)]
        socket: SocketArgs,
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
    /// Packets per second delivered through `lb mux` (1 and 2 workers) against the kernel's own
    /// IP forwarding, on veth in network namespaces the benchmark creates (root).
    Forward {
        /// Seconds per sender run.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Rounds of every case (they alternate).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Distinct flows.
        #[arg(long, default_value_t = 1024)]
        flows: u16,
    },
}

fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { files } => {
            let mut failed = false;
            for file in &files {
                match Config::load(file) {
                    Ok(config) => {
                        for w in config.warnings() {
                            writeln!(out, "{}: warning: {w}", file.display())?;
                        }
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
            what:
                BenchCommand::Forward {
                    seconds,
                    rounds,
                    flows,
                },
        } => {
            let plan = forward_bench::ForwardPlan {
                duration: std::time::Duration::from_secs_f64(seconds.clamp(0.1, 60.0)),
                rounds: rounds.clamp(1, 20),
                flows,
                ..forward_bench::ForwardPlan::default()
            };
            let lb = std::env::current_exe()?;
            let cases = forward_bench::run(&plan, &lb, &mut |line| eprintln!("{line}"))?;
            write!(out, "{}", forward_bench::table(&cases))?;
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
            } else if answer["role"] == "healthcheck" {
                write!(out, "{}", sidecar::render_status(&answer))?;
            } else {
                write!(out, "{}", render_status(&answer))?;
            }
            if answer["ok"] != true {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Ctl { socket, what } => {
            let req = match what {
                CtlCommand::Drain { backend, vip } => {
                    json!({"command": "drain", "backend": backend, "vip": vip})
                }
                CtlCommand::Undrain { backend, vip } => {
                    json!({"command": "undrain", "backend": backend, "vip": vip})
                }
                CtlCommand::SetHealth {
                    backend,
                    state,
                    vip,
                } => json!({
                    "command": "set-health",
                    "backend": backend,
                    "vip": vip,
                    "healthy": state == "healthy",
                }),
                CtlCommand::Reload => json!({"command": "reload"}),
            };
            let answer = request(&socket.path()?, &req)?;
            writeln!(out, "{answer}")?;
            if answer["ok"] != true {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Structured logs on stderr; the level from `RUST_LOG` (default `info`).
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
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
