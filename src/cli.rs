//! The `weft` command line: subcommands and their wiring.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::model::loader;
use crate::policy::Engine;
use crate::probe;

/// weft: identity-aware per-node proxy for multi-cluster Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "weft", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// NetworkPolicy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Offline what-if: decides probes against a clusterset's manifests, with reasons.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Clusterset directory: one subdirectory of manifests per cluster, named by cluster id.
    #[arg(long, value_name = "DIR")]
    clusters: PathBuf,
    /// YAML list of probes: {from, to, port, protocol, family}.
    #[arg(long, value_name = "FILE")]
    probes: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    /// An aligned table with the reasons.
    Text,
    /// JSON Lines, one object per probe.
    Json,
}

/// Parses the command line and runs it; errors are printed by `main` as one line.
pub fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Policy {
            command: PolicyCommand::Check(args),
        } => policy_check(args),
    }
}

fn policy_check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let loaded = loader::load_clusterset(&args.clusters)?;
    for w in &loaded.warnings {
        tracing::warn!(
            file = w.file.as_ref().map(|f| f.display().to_string()),
            document = w.document,
            item = w.item,
            "{}",
            w.message
        );
    }
    let engine = Engine::from_clusterset(&loaded.clusterset);
    let probes = probe::load(&args.probes, &engine)?;
    let outcomes = probe::decide(&probes, &engine);
    let out = match args.output {
        Output::Text => probe::render_text(&outcomes),
        Output::Json => probe::render_json(&outcomes),
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
