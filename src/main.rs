//! `lb`: the command-line entry point. Parses arguments (clap) and dispatches to the commands in
//! the `lb` library; all logic lives there or in `lb-core`.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lb::{bench, table};
use lb_core::config::Config;

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
    }
    Ok(ExitCode::SUCCESS)
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
