//! The `weft` command line: subcommands and their wiring.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::model::{ClusterId, loader};
use crate::policy::Engine;
use crate::probe;
use crate::tracker::tls::TlsFiles;
use crate::tracker::{client, server, source, view, wire::pb};

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
    /// Serves one view of every cluster to node agents over gRPC.
    Tracker(TrackerArgs),
}

#[derive(Debug, clap::Args)]
struct TrackerArgs {
    /// Clusterset directory: one subdirectory of manifests per cluster, named by cluster id.
    #[arg(long, value_name = "DIR", required_unless_present = "kubeconfig_dir")]
    clusters: Option<PathBuf>,
    /// Directory of kubeconfig files: every context of every file is a cluster.
    #[arg(long, value_name = "DIR")]
    kubeconfig_dir: Option<PathBuf>,
    /// Another tracker to take every other cluster from (hub and spoke): `https://HOST:PORT`
    /// with the TLS flags (this tracker's certificate is its client certificate), or
    /// `http://HOST:PORT` with --insecure.
    #[arg(long, value_name = "URL", requires = "cluster")]
    upstream: Option<String>,
    /// This spoke's own cluster: it comes from this tracker's own sources, never from the
    /// upstream.
    #[arg(long, value_name = "ID", requires = "upstream", value_parser = parse_cluster_id)]
    cluster: Option<ClusterId>,
    /// The cluster id of a kubeconfig context (`CONTEXT=ID`), for a cluster whose own
    /// ClusterProperty `cluster.clusterset.k8s.io` names none.
    #[arg(long, value_name = "CONTEXT=ID", value_parser = parse_cluster_name)]
    cluster_name: Vec<(String, ClusterId)>,
    /// Address of the gRPC service.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:19090")]
    listen: SocketAddr,
    /// Address of the admin endpoint: /healthz, /readyz (every cluster synced), /metrics.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:19091")]
    admin: SocketAddr,
    #[command(flatten)]
    tls: TlsArgs,
    /// Changes (objects and statuses) kept for subscribers that reconnect.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    history: usize,
    /// How long a cluster whose API server is unreachable keeps its last state (fail
    /// static); past it, its pods stop matching selectors.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    max_staleness: u64,
    /// Quiet time after a change to a watched directory before it is read again.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    debounce_ms: u64,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Offline what-if: decides probes against a clusterset's manifests, with reasons.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Clusterset directory: one subdirectory of manifests per cluster, named by cluster id.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "tracker",
        conflicts_with = "tracker"
    )]
    clusters: Option<PathBuf>,
    /// Take the clusters from a tracker instead: `https://HOST:PORT` with the TLS flags, or
    /// `http://HOST:PORT` with --insecure.
    #[arg(long, value_name = "URL")]
    tracker: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// How long to wait for every cluster to be synced.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 30,
        requires = "tracker"
    )]
    sync_timeout: u64,
    /// YAML list of probes: {from, to, port, protocol, family}.
    #[arg(long, value_name = "FILE")]
    probes: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Mutual TLS with the tracker's peers, or plaintext when asked for explicitly.
#[derive(Debug, clap::Args)]
struct TlsArgs {
    /// This side's certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"], conflicts_with = "insecure")]
    tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA the other side's certificate is verified against (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Plaintext, with no mutual TLS: only for tests and demos on one machine.
    #[arg(long)]
    insecure: bool,
}

impl TlsArgs {
    /// The TLS files, `None` with --insecure, or an error when neither was asked for.
    fn load(&self, what: &str) -> anyhow::Result<Option<TlsFiles>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles::load(cert, key, ca)?)),
            _ if self.insecure => {
                tracing::warn!(
                    what,
                    "plaintext: the tracker's stream is neither authenticated nor encrypted"
                );
                Ok(None)
            }
            _ => bail!(
                "{what}: pass --tls-cert, --tls-key and --tls-ca for mutual TLS, or --insecure for plaintext (tests and demos on one machine only)"
            ),
        }
    }
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
        Command::Tracker(args) => tracker(args),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

fn parse_cluster_id(s: &str) -> Result<ClusterId, String> {
    ClusterId::new(s).map_err(|e| e.to_string())
}

fn parse_cluster_name(s: &str) -> Result<(String, ClusterId), String> {
    let (context, id) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not CONTEXT=ID"))?;
    Ok((
        context.to_owned(),
        ClusterId::new(id).map_err(|e| e.to_string())?,
    ))
}

fn tracker(args: TrackerArgs) -> anyhow::Result<ExitCode> {
    let tls = args.tls.load("weft tracker")?;
    let epoch = uuid::Uuid::new_v4().to_string();
    let tracker = server::Tracker::new(
        view::View::new(epoch.clone(), args.history),
        server::SNAPSHOT_PART_BYTES,
    );
    let debounce = Duration::from_millis(args.debounce_ms);
    let max_staleness = Duration::from_secs(args.max_staleness);
    let names: BTreeMap<String, ClusterId> = args.cluster_name.into_iter().collect();
    // The clusters this tracker's own sources name (kubeconfig contexts as named at start).
    let mut local: BTreeSet<ClusterId> = args
        .kubeconfig_dir
        .as_deref()
        .map(|dir| source::kubernetes::cluster_ids(dir, &names))
        .unwrap_or_default();
    let mut clusterset = None;
    if let Some(dir) = &args.clusters {
        // At start, a clusterset that does not load is an error; later, a bad file is
        // reported and its cluster keeps its last good state.
        let mut source = source::ClustersetSource::new(dir);
        let initial = source.rescan()?;
        if let Some(failed) = initial.clusters.iter().find(|s| !s.error.is_empty()) {
            bail!("{}", failed.error);
        }
        if initial.clusters.is_empty() {
            bail!("{}: no cluster directory in the clusterset", dir.display());
        }
        for id in initial
            .clusters
            .iter()
            .filter_map(|s| ClusterId::new(&s.cluster).ok())
        {
            if let (false, Some(kubeconfigs)) = (local.insert(id.clone()), &args.kubeconfig_dir) {
                bail!(
                    "cluster {id} is claimed by both {} and {}",
                    dir.display(),
                    kubeconfigs.display()
                );
            }
        }
        tracker.apply_from(&source.name(), initial);
        clusterset = Some(source);
    }
    let upstream = match (&args.upstream, args.cluster) {
        (Some(url), Some(own)) => {
            if !local.contains(&own) {
                bail!(
                    "--cluster {own}: no --clusters or --kubeconfig-dir source names it; a spoke watches its own cluster itself"
                );
            }
            Some((client::Target::new(url, tls.clone())?, own))
        }
        _ => None,
    };
    runtime()?.block_on(async {
        if let Some(source) = clusterset {
            let watched = tracker.clone();
            tokio::spawn(async move {
                if let Err(e) = source::watch(source, watched, debounce).await {
                    tracing::error!(error = %e, "clusterset watch failed: the view no longer follows the directory");
                }
            });
        }
        if let Some((target, own)) = upstream {
            tracing::info!(upstream = %target.url(), cluster = %own, "spoke: every other cluster comes from the hub");
            tokio::spawn(source::upstream::follow(
                target,
                own,
                tracker.clone(),
                max_staleness,
                Duration::from_secs(1),
            ));
        }
        if let Some(dir) = args.kubeconfig_dir {
            let watched = tracker.clone();
            tokio::spawn(async move {
                if let Err(e) = source::kubernetes::watch_kubeconfigs(dir, names, watched, debounce, max_staleness).await {
                    tracing::error!(error = %e, "kubeconfig watch failed: clusters no longer follow the directory");
                }
            });
        }
        let admin = tokio::net::TcpListener::bind(args.admin)
            .await
            .with_context(|| format!("--admin {}", args.admin))?;
        tracing::info!(addr = %admin.local_addr()?, "admin endpoint");
        tokio::spawn(crate::admin::serve(admin, tracker.clone(), std::future::pending()));
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("--listen {}", args.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, %epoch, tls = tls.is_some(), "tracker serving");
        tracker
            .serve(listener, tls.as_ref(), async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving")?;
        Ok(ExitCode::SUCCESS)
    })
}

fn log_warnings(warnings: &[loader::LoadWarning]) {
    for w in warnings {
        tracing::warn!(
            file = w.file.as_ref().map(|f| f.display().to_string()),
            document = w.document,
            item = w.item,
            "{}",
            w.message
        );
    }
}

fn policy_check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let replica;
    let engine = match (&args.clusters, &args.tracker) {
        (Some(dir), _) => {
            let loaded = loader::load_clusterset(dir)?;
            log_warnings(&loaded.warnings);
            &Engine::from_clusterset(&loaded.clusterset)
        }
        (None, Some(url)) => {
            let tls = args.tls.load("weft policy check --tracker")?;
            let target = client::Target::new(url, tls)?;
            let request = pb::SubscribeRequest {
                node: String::new(),
                cluster: String::new(),
                policy_scope: pb::PolicyScope::AllClusters.into(),
                resume: None,
            };
            let timeout = Duration::from_secs(args.sync_timeout);
            replica = runtime()?.block_on(client::sync(&target, request, timeout))?;
            replica.engine()
        }
        (None, None) => bail!("--clusters or --tracker is required"),
    };
    let probes = probe::load(&args.probes, engine)?;
    let outcomes = probe::decide(&probes, engine);
    let out = match args.output {
        Output::Text => probe::render_text(&outcomes),
        Output::Json => probe::render_json(&outcomes),
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
