//! The `weft` command line: subcommands and their wiring.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::ca;
use crate::identity::{WorkloadId, id, trust_domain_for};
use crate::model::{ClusterId, loader};
use crate::node::explain::{Answer, Question};
use crate::policy::Engine;
use crate::probe;
use crate::tracker::replica::Replica;
use crate::tracker::tls::{self, TlsFiles};
use crate::tracker::{client, server, source, view, wire::pb};

/// weft: identity-aware per-node proxy for multi-cluster Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "weft", version, about)]
pub struct Cli {
    /// How logs are written to stderr: text for people, json (one object per line) for
    /// collectors and the decision log.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// JSON Lines.
    Json,
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
    /// Signs SPIFFE certificates for the pods of the calling node (one CA per cluster).
    Ca(CaArgs),
    /// The node agent: captures the node's pod traffic and carries it in mTLS tunnels, as
    /// NetworkPolicies and identity rules allow.
    Node(Box<NodeArgs>),
    /// The whole system on this machine, in network namespaces: the two-cluster demo (or
    /// --clusters DIR), step by step, with real traffic through the node agents.
    Demo(crate::demo::DemoArgs),
    /// Asks this node's agent why a connection would be allowed or denied: the decisions its
    /// listeners would make, with the deciding policies (its admin endpoint's /explain).
    Explain(ExplainArgs),
    /// Development certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Debug, clap::Args)]
struct CaArgs {
    /// This CA's cluster: it signs only for Running pods of this cluster.
    #[arg(long, value_name = "ID", value_parser = parse_cluster_id)]
    cluster: ClusterId,
    /// The cluster's SPIFFE trust domain (default: derived from the cluster id).
    #[arg(long, value_name = "TD")]
    trust_domain: Option<String>,
    /// The CA certificate (PEM): a root, or an intermediate (possibly followed by its chain).
    #[arg(long, value_name = "FILE")]
    ca_cert: PathBuf,
    /// The CA's private key (PKCS#8 PEM).
    #[arg(long, value_name = "FILE")]
    ca_key: PathBuf,
    /// The chain above an intermediate CA certificate (PEM), sent with every certificate.
    #[arg(long, value_name = "FILE")]
    ca_chain: Option<PathBuf>,
    /// Address of the gRPC service.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:19443")]
    listen: SocketAddr,
    /// Address of the admin endpoint: /healthz, /readyz (the view is complete), /metrics.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:19444")]
    admin: SocketAddr,
    /// The certificate chain the CA serves TLS with (PEM); node agents verify it against their
    /// configured root.
    #[arg(long, value_name = "FILE")]
    serving_cert: PathBuf,
    /// The key of --serving-cert (PEM).
    #[arg(long, value_name = "FILE")]
    serving_key: PathBuf,
    /// Nodes authenticate with tokens from this file: `TOKEN NODE` lines, or a YAML list of
    /// {token, node} for a .yaml/.yml file. Read again when it changes.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present_any = ["kubeconfig", "in_cluster"],
        conflicts_with_all = ["kubeconfig", "in_cluster"]
    )]
    bootstrap_tokens: Option<PathBuf>,
    /// Nodes authenticate with the node agent's projected ServiceAccount token, reviewed by
    /// the API server of this kubeconfig's current context (TokenReview).
    #[arg(
        long,
        value_name = "FILE",
        requires = "token_audience",
        conflicts_with = "in_cluster"
    )]
    kubeconfig: Option<PathBuf>,
    /// As --kubeconfig, with the API server of the cluster this CA runs in, reached as a pod
    /// reaches it (the kubelet's address, no DNS; the pod's ServiceAccount).
    #[arg(long, requires = "token_audience")]
    in_cluster: bool,
    /// The audience node agents' tokens must be for.
    #[arg(long, value_name = "AUD", conflicts_with = "bootstrap_tokens")]
    token_audience: Option<String>,
    /// The node agent's ServiceAccount: only its tokens authenticate nodes.
    #[arg(
        long,
        value_name = "NAMESPACE/NAME",
        default_value = "weft-system/weft-node"
    )]
    agent_service_account: String,
    /// The tracker whose view authorises every call: `https://HOST:PORT` with the TLS flags,
    /// or `http://HOST:PORT` with --insecure.
    #[arg(long, value_name = "URL")]
    tracker: String,
    /// The name the tracker's certificate must carry (default: the host of --tracker).
    #[arg(long, value_name = "NAME")]
    tracker_server_name: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// The longest lifetime granted (seconds, or with a unit: 90s, 30m, 24h, 7d).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    max_ttl: Duration,
    /// The shortest lifetime granted: shorter asks are raised to it.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    min_ttl: Duration,
}

#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// Remove weft's nftables table and policy routing from this network namespace and exit.
    #[arg(long)]
    cleanup: bool,
    /// This node's cluster.
    #[arg(long, value_name = "ID", value_parser = parse_cluster_id, required_unless_present = "cleanup")]
    cluster: Option<ClusterId>,
    /// This node's name, as its Node object has it.
    #[arg(long, value_name = "NAME", required_unless_present = "cleanup")]
    node: Option<String>,
    /// The tracker: `https://HOST:PORT` with the TLS flags, or `http://HOST:PORT` with
    /// --insecure.
    #[arg(long, value_name = "URL", required_unless_present = "cleanup")]
    tracker: Option<String>,
    /// The name the tracker's certificate must carry (default: the host of --tracker).
    #[arg(long, value_name = "NAME")]
    tracker_server_name: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// The cluster's CA: `https://HOST:PORT`.
    #[arg(long, value_name = "URL", required_unless_present = "cleanup")]
    ca: Option<String>,
    /// The root the CA's serving certificate is verified against (PEM).
    #[arg(long, value_name = "FILE", required_unless_present = "cleanup")]
    ca_root: Option<PathBuf>,
    /// The name the CA's serving certificate must carry (default: the host of --ca).
    #[arg(long, value_name = "NAME")]
    ca_server_name: Option<String>,
    /// The node's credential for the CA (a bootstrap token, or a projected ServiceAccount
    /// token), read again at each request.
    #[arg(long, value_name = "FILE", required_unless_present = "cleanup")]
    token_file: Option<PathBuf>,
    /// Trust bundles: one `TRUST_DOMAIN.pem` (or SPIFFE `.json`) per trust domain.
    #[arg(long, value_name = "DIR", required_unless_present = "cleanup")]
    bundles: Option<PathBuf>,
    /// Outbound listener: captured connections of local pods (`[::]`: both families).
    #[arg(long, value_name = "ADDR", default_value = "[::]:15001")]
    outbound: SocketAddr,
    /// Inbound plaintext listener.
    #[arg(long, value_name = "ADDR", default_value = "[::]:15006")]
    inbound: SocketAddr,
    /// HBONE listener (mTLS tunnels).
    #[arg(long, value_name = "ADDR", default_value = "[::]:15008")]
    hbone: SocketAddr,
    /// Admin endpoint, with /config_dump: keep it on localhost.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Metrics endpoint (/metrics).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15020")]
    metrics: SocketAddr,
    /// Readiness endpoint (/healthz/ready).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:15021")]
    readiness: SocketAddr,
    /// The socket mark of weft's own sockets (never captured again); not 0, and not capture's
    /// 0x111 in the bits 0xfff.
    #[arg(long, value_name = "MARK", default_value = "0x539", value_parser = parse_mark)]
    mark: u32,
    /// The lifetime asked for workload certificates (renewed at about half of it).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    certificate_ttl: Duration,
    /// How often weft's nftables table is checked, and restored if another program changed it.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    table_check_interval: Duration,
    /// An HBONE connection without tunnels for this long is closed.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// At SIGTERM or SIGINT, how long the connections already carried may go on (new ones
    /// fail closed at once); a second signal ends them at once. Keep it under the pod's
    /// terminationGracePeriodSeconds.
    #[arg(long, value_name = "DURATION", default_value = "25s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Tunnels one HBONE connection carries at once.
    #[arg(long, value_name = "N", env = "WEFT_MAX_STREAMS_PER_CONNECTION", default_value_t = crate::proxy::pool::DEFAULT_MAX_STREAMS_PER_CONNECTION)]
    max_streams_per_connection: usize,
    /// HBONE connections one source address may hold at once (past it, new ones are reset).
    #[arg(long, value_name = "N", default_value_t = crate::proxy::hbone::DEFAULT_MAX_CONNECTIONS_PER_SOURCE)]
    max_connections_per_source: usize,
    /// Dial the pods of admitted connections, and destinations outside the mesh, from the
    /// node's own address, not from their source's (by default each sees who connected, as
    /// without weft).
    #[arg(long)]
    dial_from_node: bool,
    /// The interfaces local pods' traffic arrives by, as the CNI names them (`cali*`, `lxc*`,
    /// `cni0`; a trailing `*` matches a prefix): an address behind them that is no local pod
    /// weft knows yet (a pod started before the view has it) sends and receives nothing until
    /// it is one. Empty (the default): such a pod's traffic passes uncaptured until then.
    #[arg(long, value_name = "PATTERN,...", value_delimiter = ',')]
    pod_interfaces: Vec<String>,
    /// The `nft` program.
    #[arg(long, value_name = "PATH", default_value = "nft")]
    nft: PathBuf,
    /// Threads carrying traffic (as ztunnel's worker threads); by default half the node's
    /// CPUs, at least one.
    #[arg(long, value_name = "N", env = "WEFT_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=64))]
    worker_threads: Option<u16>,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Writes a development PKI per trust domain: a root, the CA's and the tracker's serving
    /// certificates, tracker client certificates (admin, each node, every node) and bootstrap
    /// tokens.
    Init(CertsInitArgs),
}

#[derive(Debug, clap::Args)]
struct CertsInitArgs {
    /// Where to write: one subdirectory per trust domain.
    #[arg(long, value_name = "DIR", default_value = "certs")]
    out: PathBuf,
    /// A trust domain (also the cluster id in the tracker's SPIFFE ids); repeat for several.
    #[arg(long = "trust-domain", value_name = "TD", required = true)]
    trust_domains: Vec<String>,
    /// Nodes to write bootstrap tokens and tracker client certificates for.
    #[arg(long, value_name = "N", default_value_t = 2)]
    nodes: usize,
    /// A DNS name the tracker's and the CA's serving certificates are for, besides localhost
    /// (`weft-tracker.weft-system.svc`); repeat for several.
    #[arg(long = "server-name", value_name = "DNS")]
    server_names: Vec<String>,
    /// Replace a trust domain's existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct TrackerArgs {
    /// Clusterset directory: one subdirectory of manifests per cluster, named by cluster id.
    #[arg(long, value_name = "DIR", required_unless_present_any = ["kubeconfig_dir", "in_cluster"])]
    clusters: Option<PathBuf>,
    /// Directory of kubeconfig files: every context of every file is a cluster.
    #[arg(long, value_name = "DIR")]
    kubeconfig_dir: Option<PathBuf>,
    /// Also watch the cluster this tracker runs in, reached as a pod reaches its API server:
    /// the address the kubelet gives every pod (no DNS, which node agents may be holding),
    /// the pod's ServiceAccount token and CA. Its context is `in-cluster`.
    #[arg(long)]
    in_cluster: bool,
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
    /// For people: an aligned table with the reasons (`policy check`), one line per decision
    /// (`explain`).
    Text,
    /// JSON: one object per probe and line (`policy check`), the node's answer (`explain`).
    Json,
}

#[derive(Debug, clap::Args)]
struct ExplainArgs {
    /// The source address.
    #[arg(long, value_name = "IP")]
    from: std::net::IpAddr,
    /// The destination address and port (a Service's or a pod's).
    #[arg(long, value_name = "IP:PORT")]
    to: SocketAddr,
    /// The identity the source proves on a tunnel (by default a meshed source pod's own).
    #[arg(long, value_name = "SPIFFE_ID", value_parser = parse_workload_id)]
    identity: Option<WorkloadId>,
    /// The node agent's admin endpoint (it answers on localhost only).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// How long `weft explain` waits for the node agent.
const EXPLAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The most of an answer `weft explain` reads.
const EXPLAIN_LIMIT: usize = 1 << 20;

/// Parses the command line and runs it; errors are printed by `main` as one line.
pub fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
    match cli.command {
        Command::Policy {
            command: PolicyCommand::Check(args),
        } => policy_check(args),
        Command::Tracker(args) => tracker(args),
        Command::Ca(args) => ca(args),
        Command::Node(args) => node(*args),
        Command::Demo(args) => Ok(crate::demo::run(args)?),
        Command::Explain(args) => explain(args),
        Command::Certs {
            command: CertsCommand::Init(args),
        } => certs_init(args),
    }
}

fn parse_workload_id(s: &str) -> Result<WorkloadId, String> {
    WorkloadId::parse(s).map_err(|e| e.to_string())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

fn parse_cluster_id(s: &str) -> Result<ClusterId, String> {
    ClusterId::new(s).map_err(|e| e.to_string())
}

/// Seconds, or a number with a unit: `ms`, `s`, `m`, `h` or `d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: expected seconds, or a number with ms, s, m, h or d");
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let millis: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(millis))
        .map(Duration::from_millis)
        .ok_or_else(bad)
}

/// A socket mark: decimal or `0x` hexadecimal, not 0.
fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    match parsed {
        Ok(0) => Err("mark 0 would exempt every unmarked packet from capture".into()),
        Ok(mark) => Ok(mark),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
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
    let in_cluster = if args.in_cluster {
        Some(source::kubernetes::in_cluster()?)
    } else {
        None
    };
    // The clusters this tracker's own sources name (kubeconfig contexts as named at start).
    let mut local: BTreeSet<ClusterId> = source::kubernetes::cluster_ids(
        args.kubeconfig_dir.as_deref(),
        in_cluster.as_ref(),
        &names,
    );
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
            if !local.insert(id.clone()) {
                let kubernetes = match &args.kubeconfig_dir {
                    Some(kubeconfigs) => kubeconfigs.display().to_string(),
                    None => "--in-cluster".to_owned(),
                };
                bail!(
                    "cluster {id} is claimed by both {} and {kubernetes}",
                    dir.display()
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
                    "--cluster {own}: no --clusters, --kubeconfig-dir or --in-cluster source names it; a spoke watches its own cluster itself"
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
        if args.kubeconfig_dir.is_some() || in_cluster.is_some() {
            let watched = tracker.clone();
            let dir = args.kubeconfig_dir.clone();
            tokio::spawn(async move {
                if let Err(e) = source::kubernetes::watch_kubeconfigs(dir, in_cluster, names, watched, debounce, max_staleness).await {
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

/// The trust domain of `cluster` once the view is complete: its settings' (`cluster.yaml`,
/// relayed by the tracker), else derived from its id.
async fn settled_trust_domain(
    view: &RwLock<Replica>,
    cluster: &ClusterId,
) -> anyhow::Result<spiffe::TrustDomain> {
    let mut waited = Duration::ZERO;
    loop {
        {
            let view = view.read().unwrap_or_else(|e| e.into_inner());
            if view.ready() {
                let status = view
                    .clusters()
                    .find(|s| s.cluster == cluster.as_str())
                    .with_context(|| {
                        format!("--cluster {cluster}: the tracker has no such cluster")
                    })?;
                let configured = Some(status.trust_domain.as_str()).filter(|td| !td.is_empty());
                return trust_domain_for(cluster, configured)
                    .with_context(|| format!("the trust domain of cluster {cluster}"));
            }
        }
        if waited.as_secs().is_multiple_of(10) && waited.subsec_millis() == 0 {
            tracing::info!(%cluster, waited_s = waited.as_secs(), "waiting for the tracker's view to learn the trust domain");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
}

fn ca(args: CaArgs) -> anyhow::Result<ExitCode> {
    // The trust domain is the flag's, else the cluster's settings' as the tracker relays
    // them (`cluster.yaml`), else derived from the cluster id: the last two are known only
    // once the view is, so the CA's files are checked now and its trust domain then.
    let flagged = args
        .trust_domain
        .as_deref()
        .map(|td| trust_domain_for(&args.cluster, Some(td)).context("--trust-domain"))
        .transpose()?;
    let limits = ca::TtlLimits::new(args.min_ttl, args.max_ttl)?;
    let signer = ca::Signer::load_any(
        &args.ca_cert,
        &args.ca_key,
        args.ca_chain.as_deref(),
        limits,
    )?;
    if let Some(td) = &flagged {
        signer.check_trust_domain(td)?;
    }
    let serving = tls::ServingFiles::load(&args.serving_cert, &args.serving_key)?;
    let (agent_namespace, agent_account) = args
        .agent_service_account
        .split_once('/')
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'))
        .with_context(|| {
            format!(
                "--agent-service-account {:?}: expected NAMESPACE/NAME",
                args.agent_service_account
            )
        })?;
    let target = server_named(
        client::Target::new(&args.tracker, args.tls.load("weft ca --tracker")?)?,
        args.tracker_server_name.as_deref(),
    )?;
    runtime()?.block_on(async {
        let reviewer = match (&args.kubeconfig, args.in_cluster) {
            (Some(file), _) => Some((
                kube::config::Kubeconfig::read_from(file)
                    .with_context(|| format!("--kubeconfig {}", file.display()))?,
                format!("--kubeconfig {}", file.display()),
            )),
            (None, true) => Some((source::kubernetes::in_cluster()?, "--in-cluster".to_owned())),
            (None, false) => None,
        };
        let authn: Arc<dyn ca::Authenticator> = match (&args.bootstrap_tokens, reviewer) {
            (Some(file), _) => Arc::new(ca::BootstrapTokens::load(file)?),
            (None, Some((kubeconfig, what))) => {
                let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .with_context(|| what.clone())?;
                let client = kube::Client::try_from(config).with_context(|| what.clone())?;
                let audience = args.token_audience.as_deref().unwrap_or_default();
                Arc::new(ca::TokenReviewer::new(
                    client,
                    audience,
                    agent_namespace,
                    agent_account,
                ))
            }
            (None, None) => bail!("--bootstrap-tokens, --kubeconfig or --in-cluster is required"),
        };
        let view = Arc::new(RwLock::new(Replica::new()));
        let request = pb::SubscribeRequest {
            cluster: args.cluster.to_string(),
            policy_scope: pb::PolicyScope::OwnCluster.into(),
            ..Default::default()
        };
        tracing::info!(tracker = %target.url(), "following the tracker's view");
        tokio::spawn(client::follow(
            target,
            request,
            view.clone(),
            Duration::from_secs(1),
        ));
        let trust_domain = match flagged {
            Some(td) => td,
            None => {
                let td = settled_trust_domain(&view, &args.cluster).await?;
                signer.check_trust_domain(&td)?;
                td
            }
        };
        let authz = ca::Authorizer::new(args.cluster.clone(), trust_domain.clone(), view);
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("--listen {}", args.listen))?;
        tracing::info!(
            addr = %listener.local_addr()?,
            cluster = %args.cluster,
            %trust_domain,
            max_ttl_seconds = limits.max().as_secs(),
            min_ttl_seconds = limits.min().as_secs(),
            "CA serving"
        );
        let ca = ca::Ca::new(signer, authn, authz);
        let admin = tokio::net::TcpListener::bind(args.admin)
            .await
            .with_context(|| format!("--admin {}", args.admin))?;
        tracing::info!(addr = %admin.local_addr()?, "admin endpoint");
        tokio::spawn(crate::admin::serve(
            admin,
            ca.clone(),
            std::future::pending(),
        ));
        ca.serve(listener, serving, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")?;
        Ok(ExitCode::SUCCESS)
    })
}

fn node(args: NodeArgs) -> anyhow::Result<ExitCode> {
    use crate::node::agent::{Agent, Settings};
    use crate::redirect::{Capture, Nft, PodInterfaces, Ports, Redirect};
    let ports = Ports {
        outbound: args.outbound.port(),
        inbound: args.inbound.port(),
        hbone: args.hbone.port(),
    };
    let redirect = Redirect::new(
        Nft::new(&args.nft),
        Capture::new(ports, args.mark)
            .context("capture")?
            .with_pod_interfaces(
                PodInterfaces::new(&args.pod_interfaces).context("--pod-interfaces")?,
            ),
    );
    if args.cleanup {
        runtime()?.block_on(redirect.cleanup())?;
        println!(
            "removed table {} {}",
            crate::redirect::FAMILY,
            crate::redirect::TABLE
        );
        return Ok(ExitCode::SUCCESS);
    }
    // clap requires these unless --cleanup.
    let missing = |flag: &str| anyhow::anyhow!("{flag} is required");
    let cluster = args.cluster.ok_or_else(|| missing("--cluster"))?;
    let node = args.node.ok_or_else(|| missing("--node"))?;
    let tracker = args.tracker.ok_or_else(|| missing("--tracker"))?;
    let ca_url = args.ca.ok_or_else(|| missing("--ca"))?;
    let ca_root = args.ca_root.ok_or_else(|| missing("--ca-root"))?;
    let token_file = args.token_file.ok_or_else(|| missing("--token-file"))?;
    let bundles = args.bundles.ok_or_else(|| missing("--bundles"))?;

    let target = server_named(
        client::Target::new(&tracker, args.tls.load("weft node --tracker")?)?,
        args.tracker_server_name.as_deref(),
    )?;
    // main prints an error's outer message: each names its flag and carries its cause.
    let bundle_set = crate::identity::BundleSet::load_dir(&bundles)
        .map_err(|e| anyhow::anyhow!("--bundles {}: {e}", bundles.display()))?;
    let trust = crate::identity::TrustStore::new(bundle_set)
        .map_err(|e| anyhow::anyhow!("--bundles {}: {e}", bundles.display()))?;
    let settings = Settings {
        cluster,
        node,
        outbound: args.outbound,
        inbound: args.inbound,
        hbone: args.hbone,
        admin: args.admin,
        metrics: args.metrics,
        readiness: args.readiness,
        mark: args.mark,
        table_check_interval: args.table_check_interval,
        drain_timeout: args.drain_timeout,
        server: crate::proxy::ServerSettings {
            max_connections_per_source: args.max_connections_per_source,
            from_source: !args.dial_from_node,
            ..crate::proxy::ServerSettings::default()
        },
        client: crate::proxy::ClientSettings {
            idle_timeout: args.idle_timeout,
            max_streams_per_connection: args.max_streams_per_connection,
            ..crate::proxy::ClientSettings::default()
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            args.worker_threads
                .map_or_else(default_workers, usize::from),
        )
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let authority = ca::client::RemoteCa::with_root_file(
            &ca_url,
            &ca_root,
            args.ca_server_name.as_deref(),
            ca::client::Token::File(token_file),
        )?;
        let identities = Arc::new(crate::identity::manager::IdentityManager::new(
            Arc::new(authority),
            crate::identity::manager::Renewal {
                ttl: args.certificate_ttl,
                ..Default::default()
            },
        ));
        let followed = trust.clone();
        tokio::spawn(async move { followed.follow_dir(bundles, Duration::from_secs(5)).await });
        let agent = Agent::new(settings, identities, trust, redirect);
        // The first signal drains, a second stops at once.
        agent
            .run(target, stop_signals(1)?, stop_signals(2)?)
            .await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// The node agent's worker threads when not given: half the CPUs, at least one. Each byte
/// weft carries costs as much CPU again in the kernel and the pods at both ends; on two CPUs,
/// a second worker added 50 µs to a round trip (tokio waking it to steal work the first was
/// already running) and no throughput.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Resolves at the `n`th SIGINT or SIGTERM from now (SIGTERM is how a DaemonSet's pod is
/// stopped). Call it inside the runtime.
fn stop_signals(n: usize) -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let watching = "watching for SIGTERM and SIGINT";
    let mut term = signal(SignalKind::terminate()).context(watching)?;
    let mut int = signal(SignalKind::interrupt()).context(watching)?;
    Ok(async move {
        for _ in 0..n {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
    })
}

/// `target`, whose certificate must carry `name` when one is given.
fn server_named(target: client::Target, name: Option<&str>) -> anyhow::Result<client::Target> {
    Ok(match name {
        Some(name) => target
            .with_server_name(name)
            .context("--tracker-server-name")?,
        None => target,
    })
}

fn certs_init(args: CertsInitArgs) -> anyhow::Result<ExitCode> {
    let domains = args
        .trust_domains
        .iter()
        .map(|td| id::trust_domain(td).with_context(|| format!("--trust-domain {td}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for td in &domains {
        let written =
            ca::dev_pki::generate(&args.out, td, args.nodes, &args.server_names, args.force)?;
        println!("{}: {}", written.dir.display(), written.files.join(" "));
    }
    Ok(ExitCode::SUCCESS)
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

fn explain(args: ExplainArgs) -> anyhow::Result<ExitCode> {
    let question = Question {
        from: args.from.to_canonical(),
        to: args.to,
        identity: args.identity,
    };
    let path = format!("/explain?{}", question.to_query());
    let asking = || format!("asking the node agent at {} (--admin)", args.admin);
    let get = async {
        let stream = tokio::net::TcpStream::connect(args.admin).await?;
        let host = args.admin.to_string();
        anyhow::Ok(crate::admin::get(stream, &host, &path, EXPLAIN_LIMIT).await?)
    };
    let answer = runtime()?
        .block_on(async { tokio::time::timeout(EXPLAIN_TIMEOUT, get).await })
        .map_err(|_| anyhow::anyhow!("no answer within {EXPLAIN_TIMEOUT:?}"))
        .and_then(|answer| answer)
        .with_context(asking)?;
    let body = String::from_utf8_lossy(&answer.body);
    if answer.status != 200 {
        bail!(
            "the node agent at {} answered {}: {}",
            args.admin,
            answer.status,
            body.trim()
        );
    }
    match args.output {
        Output::Json => println!("{}", body.trim_end()),
        Output::Text => {
            let answer: Answer =
                serde_json::from_str(&body).with_context(|| format!("{}: the answer", asking()))?;
            print!("{answer}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_workers_leave_half_the_cpus_to_the_pods() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = super::default_workers();
        assert!(workers >= 1, "no worker");
        assert!(
            2 * workers <= cpus.max(2),
            "{workers} workers on {cpus} CPUs"
        );
    }
}
