//! `weft demo`: the whole system on one machine. A scenario (the seed's two-cluster demo, built
//! in, or a directory) becomes a [`lab`] of network namespaces; a tracker, a CA per cluster and
//! a `weft node` per node run inside it; then, step by step, the step's manifests are handed
//! to the tracker and every probe is made with real TCP from its source pod, its verdict
//! compared with the offline engine's and explained from the nodes' decision logs.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use serde::Deserialize;

use crate::ca::dev_pki::{self, DevPkiError};
use crate::identity::{IdError, trust_domain_for};
use crate::lab::{self, Lab, LabError, LabNode, LabOptions, LabPod, Process};
use crate::model::loader::{self, LoadError};
use crate::model::{ClusterId, ClusterSet};
use crate::policy::{Engine, Verdict};
use crate::probe::{self, Outcome, ProbeError};

/// The built-in scenario: the seed's two-cluster demo (`examples/two-cluster/`), its shared
/// files resolved (steps 2 and 3 link to step 1's).
const TWO_CLUSTER_C1: &str =
    include_str!("../examples/two-cluster/1-no-policy/cluster-1/demo.yaml");
const TWO_CLUSTER_C2: &str =
    include_str!("../examples/two-cluster/1-no-policy/cluster-2/demo.yaml");
const TWO_CLUSTER_DENY: &str =
    include_str!("../examples/two-cluster/2-default-deny/cluster-2/policy.yaml");
const TWO_CLUSTER_ALLOW: &str =
    include_str!("../examples/two-cluster/3-allow-from-cluster-1/cluster-2/policy.yaml");
const TWO_CLUSTER_PROBES: &str = include_str!("../examples/two-cluster/probes.yaml");

/// The name of the demo's temporary directory: then its process id, so that a later run can
/// tell a dead run's.
const WORK_PREFIX: &str = "weft-demo-";
/// The tracker's gRPC port on the wire.
const TRACKER_PORT: u16 = 19090;
/// The tracker's admin port on the wire.
const TRACKER_ADMIN_PORT: u16 = 19091;
/// The first CA's gRPC port on the wire; CA `i` listens at `+ 2i`, its admin endpoint one up.
const CA_FIRST_PORT: u16 = 19443;
/// Where a node's readiness endpoint answers (on the node's address).
const NODE_READINESS_PORT: u16 = 15021;
/// Where a node's admin endpoint answers (its namespace's loopback).
const NODE_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
/// Each step of a probe (connect, answer) may take this long; a denied connection is closed
/// at once, so only an unanswered one waits it out.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after an exchange the nodes' decision lines about it are waited for.
const DECISION_WAIT: Duration = Duration::from_secs(1);
/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(100);
/// The tracker's debounce of the clusterset directory, and how long its revision must stay
/// still before a step's change counts as applied.
const DEBOUNCE: Duration = Duration::from_millis(50);
const SETTLED: Duration = Duration::from_millis(300);

/// `weft demo`'s arguments.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Another scenario: a clusterset (one step) or a directory of steps, each a clusterset,
    /// run in name order; either way with its probes in DIR/probes.yaml.
    #[arg(long, value_name = "DIR")]
    clusters: Option<PathBuf>,
    /// How long a step may take to reach every node (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    ready_timeout: u64,
}

/// Why the demo could not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The machine lacks what the lab needs.
    #[error(
        "weft demo needs root (to create network namespaces), `ip` (iproute2) and `nft` (nftables); missing: {}",
        .missing.join(", ")
    )]
    Prerequisites {
        /// What is missing.
        missing: Vec<&'static str>,
    },
    /// The scenario directory is not one.
    #[error("{}: {message}", .dir.display())]
    Scenario {
        /// The directory.
        dir: PathBuf,
        /// Why.
        message: String,
    },
    /// A step's manifests do not load.
    #[error("{0}")]
    Load(#[from] Box<LoadError>),
    /// The probes do not resolve.
    #[error("{0}")]
    Probes(#[from] ProbeError),
    /// A cluster's trust domain is not one.
    #[error("{0}")]
    TrustDomain(#[from] IdError),
    /// The development PKI cannot be written.
    #[error("{0}")]
    Pki(#[from] DevPkiError),
    /// The lab failed.
    #[error("{0}")]
    Lab(#[from] LabError),
    /// A file or directory of the demo's own cannot be written or read.
    #[error("{what}: {error}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        error: std::io::Error,
    },
    /// A process of the demo exited.
    #[error("{name} exited ({status}); its last lines:\n{tail}")]
    Exited {
        /// Its name.
        name: String,
        /// How it ended.
        status: String,
        /// What it wrote last.
        tail: String,
    },
    /// Something did not become ready in time.
    #[error("{what} not ready after {}s: {detail}", .timeout.as_secs())]
    NotReady {
        /// What.
        what: String,
        /// How long was waited.
        timeout: Duration,
        /// The last thing it said.
        detail: String,
    },
    /// Ctrl-C or SIGTERM.
    #[error("interrupted; the lab is torn down")]
    Interrupted,
}

/// Runs the demo: exit status 0 when every probe was observed as the engine expects.
pub fn run(args: DemoArgs) -> Result<ExitCode, DemoError> {
    let missing = lab::missing_prerequisites();
    if !missing.is_empty() {
        return Err(DemoError::Prerequisites { missing });
    }
    let scenario = match &args.clusters {
        Some(dir) => Scenario::from_dir(dir)?,
        None => Scenario::built_in(),
    };
    let weft = std::env::current_exe().map_err(|error| DemoError::Io {
        what: "finding the weft executable".into(),
        error,
    })?;
    let runtime = tokio::runtime::Runtime::new().map_err(|error| DemoError::Io {
        what: "starting the async runtime".into(),
        error,
    })?;
    let timeout = Duration::from_secs(args.ready_timeout);
    runtime.block_on(async {
        sweep_work_dirs();
        let work = tempfile::Builder::new()
            .prefix(&format!("{WORK_PREFIX}{}-", std::process::id()))
            .tempdir()
            .map_err(|error| DemoError::Io {
                what: "making a temporary directory".into(),
                error,
            })?;
        // Dropping the demo's future (on a signal) drops its lab: processes killed, namespaces
        // deleted; the temporary directory goes when `work` does, after it.
        let interrupted = interrupted()?;
        tokio::select! {
            result = demo(&scenario, &weft, work.path(), timeout) => result,
            () = interrupted => Err(DemoError::Interrupted),
        }
    })
}

/// Removes the temporary directories of demos whose process is gone (killed before it could
/// clean up): they hold a development PKI's keys.
fn sweep_work_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(WORK_PREFIX)
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => {
                    tracing::info!(dir = %entry.path().display(), pid, "removed what a dead demo left behind")
                }
                Err(e) => {
                    tracing::warn!(dir = %entry.path().display(), error = %e, "cannot remove what a dead demo left behind")
                }
            }
        }
    }
}

/// Ctrl-C or SIGTERM, listened for from the moment this is called (not when first awaited:
/// the demo blocks while it builds its lab, and a signal then must still tear it down).
fn interrupted() -> Result<impl Future<Output = ()>, DemoError> {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind| {
        signal(kind).map_err(|error| DemoError::Io {
            what: "listening for signals".into(),
            error,
        })
    };
    let mut interrupt = listen(SignalKind::interrupt())?;
    let mut terminate = listen(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// A scenario: steps of manifests, and the probes made at every step.
#[derive(Debug)]
struct Scenario {
    steps: Vec<Step>,
    probes: String,
    /// Where the probes come from, for errors.
    probes_file: PathBuf,
}

/// One step: a clusterset's files by path (`CLUSTER/…`).
#[derive(Debug)]
struct Step {
    name: String,
    files: BTreeMap<PathBuf, Vec<u8>>,
    /// The directory it was read from, loaded as is so that errors name the user's files.
    origin: Option<PathBuf>,
}

impl Scenario {
    fn built_in() -> Self {
        let file = |path: &str, text: &str| (PathBuf::from(path), text.as_bytes().to_vec());
        let step = |name: &str, files: Vec<(PathBuf, Vec<u8>)>| Step {
            name: name.to_owned(),
            files: files.into_iter().collect(),
            origin: None,
        };
        let c1 = || file("cluster-1/demo.yaml", TWO_CLUSTER_C1);
        let c2 = || file("cluster-2/demo.yaml", TWO_CLUSTER_C2);
        Self {
            steps: vec![
                step("1-no-policy", vec![c1(), c2()]),
                step(
                    "2-default-deny",
                    vec![c1(), c2(), file("cluster-2/policy.yaml", TWO_CLUSTER_DENY)],
                ),
                step(
                    "3-allow-from-cluster-1",
                    vec![c1(), c2(), file("cluster-2/policy.yaml", TWO_CLUSTER_ALLOW)],
                ),
            ],
            probes: TWO_CLUSTER_PROBES.to_owned(),
            probes_file: PathBuf::from("examples/two-cluster/probes.yaml (built in)"),
        }
    }

    /// A clusterset, or a directory of steps (subdirectories whose entries are all
    /// directories: clustersets), with `probes.yaml` in `dir`.
    fn from_dir(dir: &Path) -> Result<Self, DemoError> {
        let bad = |message: String| DemoError::Scenario {
            dir: dir.to_owned(),
            message,
        };
        let probes_file = dir.join("probes.yaml");
        let probes = std::fs::read_to_string(&probes_file)
            .map_err(|e| bad(format!("probes.yaml: {e} (the probes of every step)")))?;
        let subdirs = visible_dirs(dir).map_err(|e| bad(e.to_string()))?;
        let mut is_steps = !subdirs.is_empty();
        for sub in &subdirs {
            let entries = visible_entries(sub).map_err(|e| bad(e.to_string()))?;
            is_steps &= !entries.is_empty() && entries.iter().all(|e| e.is_dir());
        }
        let step_dirs = if is_steps {
            subdirs
        } else {
            vec![dir.to_owned()]
        };
        let mut steps = Vec::new();
        for step_dir in step_dirs {
            let mut files = BTreeMap::new();
            for cluster in visible_dirs(&step_dir).map_err(|e| bad(e.to_string()))? {
                collect_files(&cluster, &step_dir, &mut files, 0)
                    .map_err(|e| bad(e.to_string()))?;
            }
            steps.push(Step {
                name: step_dir.file_name().map_or_else(
                    || step_dir.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                ),
                files,
                origin: Some(step_dir),
            });
        }
        Ok(Self {
            steps,
            probes,
            probes_file,
        })
    }
}

/// The entries of `dir` not starting with a dot, sorted.
fn visible_entries(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            entries.push(entry.path());
        }
    }
    entries.sort();
    Ok(entries)
}

/// The visible subdirectories of `dir` (following symbolic links), sorted.
fn visible_dirs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    Ok(visible_entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect())
}

/// Reads every visible file under `dir` into `files`, keyed by its path below `base`.
fn collect_files(
    dir: &Path,
    base: &Path,
    files: &mut BTreeMap<PathBuf, Vec<u8>>,
    depth: usize,
) -> std::io::Result<()> {
    // Symbolic links are followed (the seed's steps share files that way): bound the depth
    // so that a link loop ends.
    if depth > 16 {
        return Err(std::io::Error::other(format!(
            "{}: nested too deep (a symbolic link loop?)",
            dir.display()
        )));
    }
    for path in visible_entries(dir)? {
        if path.is_dir() {
            collect_files(&path, base, files, depth + 1)?;
        } else {
            let contents = std::fs::read(&path)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            let relative = path.strip_prefix(base).unwrap_or(&path).to_owned();
            files.insert(relative, contents);
        }
    }
    Ok(())
}

/// Makes `dir` hold exactly `step`'s files, given that it holds `previous`'s: changed files
/// are renamed into place (the tracker never reads half a file), others removed.
fn write_step(dir: &Path, previous: Option<&Step>, step: &Step) -> Result<(), DemoError> {
    let io = |what: String| move |error| DemoError::Io { what, error };
    let old = previous.map(|p| &p.files);
    for (relative, contents) in &step.files {
        if old.and_then(|o| o.get(relative)) == Some(contents) {
            continue;
        }
        let path = dir.join(relative);
        let parent = path.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent).map_err(io(format!("{}", parent.display())))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Hidden, so the tracker's loader skips it until it is renamed.
        let staging = parent.join(format!(".{name}.weft-demo"));
        std::fs::write(&staging, contents).map_err(io(format!("{}", staging.display())))?;
        std::fs::rename(&staging, &path).map_err(io(format!("{}", path.display())))?;
    }
    for relative in old.into_iter().flat_map(|o| o.keys()) {
        if !step.files.contains_key(relative) {
            let path = dir.join(relative);
            std::fs::remove_file(&path).map_err(io(format!("{}", path.display())))?;
        }
    }
    // A cluster the step no longer has leaves the view with its directory.
    let clusters: BTreeSet<_> = step.files.keys().filter_map(|p| p.iter().next()).collect();
    let entries = visible_dirs(dir).map_err(io(format!("{}", dir.display())))?;
    for cluster in entries {
        if cluster
            .file_name()
            .is_some_and(|name| !clusters.contains(name))
        {
            std::fs::remove_dir_all(&cluster).map_err(io(format!("{}", cluster.display())))?;
        }
    }
    Ok(())
}

/// A step loaded: its clusterset and what the engine expects of every probe.
struct Expected {
    clusterset: ClusterSet,
    outcomes: Vec<Outcome>,
}

fn load_step(
    step: &Step,
    staging: &Path,
    scenario: &Scenario,
    warned: &mut BTreeSet<String>,
) -> Result<Expected, DemoError> {
    let dir = match &step.origin {
        Some(dir) => dir.clone(),
        None => {
            write_step(staging, None, step)?;
            staging.to_owned()
        }
    };
    let loaded = loader::load_clusterset(&dir).map_err(Box::new)?;
    for warning in &loaded.warnings {
        // Steps share files: say each finding once, naming the file within the step.
        let file = warning
            .file
            .as_deref()
            .map(|f| f.strip_prefix(&dir).unwrap_or(f).display().to_string());
        let text = format!("{}: {}", file.as_deref().unwrap_or("-"), warning.message);
        if warned.insert(text.clone()) {
            tracing::warn!(step = %step.name, file, document = warning.document, "{}", warning.message);
        }
    }
    let engine = Engine::from_clusterset(&loaded.clusterset);
    let probes = probe::parse(&scenario.probes_file, &scenario.probes, &engine)?;
    Ok(Expected {
        outcomes: probe::decide(&probes, &engine),
        clusterset: loaded.clusterset,
    })
}

/// Every node and pod of any step (the first step's where they differ): the lab has one
/// namespace for each, whichever steps they appear in.
fn union(expected: &[Expected]) -> ClusterSet {
    let mut all = ClusterSet::default();
    for step in expected {
        for (id, cluster) in &step.clusterset.clusters {
            let into = all.clusters.entry(id.clone()).or_insert_with(|| {
                crate::model::Cluster::new(id.clone(), cluster.settings.clone())
            });
            for (name, node) in &cluster.nodes {
                into.nodes
                    .entry(name.clone())
                    .or_insert_with(|| node.clone());
            }
            for pod in cluster.pods.values() {
                if into.pod(&pod.namespace, &pod.name).is_none() {
                    into.pods.insert(pod.uid.clone(), pod.clone());
                }
            }
        }
    }
    all
}

/// The PKI of one trust domain, in the demo's directory.
struct TrustDomainFiles {
    dir: PathBuf,
    /// The CA's bootstrap tokens file, `TOKEN NODE` for the lab's nodes of its cluster.
    tokens: PathBuf,
}

/// A running `weft node`.
struct RunningNode<'lab> {
    node: &'lab LabNode,
    process: Process,
}

/// What a node's `/config_dump` says, as far as the demo reads it.
#[derive(Debug, Deserialize)]
struct ConfigDump {
    ready: bool,
    #[serde(default)]
    not_ready_because: Option<String>,
    revision: u64,
    #[serde(default)]
    policies: Vec<PolicyName>,
}

#[derive(Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
struct PolicyName {
    kind: String,
    cluster: String,
    namespace: String,
    name: String,
}

/// One decision line of a node's log (`target: weft::decision`).
#[derive(Debug, Deserialize)]
struct DecisionLine {
    direction: String,
    source: String,
    destination: String,
    #[serde(default)]
    source_identity: String,
    #[serde(default)]
    destination_identity: String,
    verdict: String,
    layer: String,
    reason: String,
}

fn decision_line(line: &str) -> Option<DecisionLine> {
    #[derive(Deserialize)]
    struct Event {
        target: String,
        fields: serde_json::Value,
    }
    let event: Event = serde_json::from_str(line).ok()?;
    if event.target != "weft::decision" {
        return None;
    }
    serde_json::from_value(event.fields).ok()
}

async fn demo(
    scenario: &Scenario,
    weft: &Path,
    work: &Path,
    timeout: Duration,
) -> Result<ExitCode, DemoError> {
    let io = |what: String| move |error| DemoError::Io { what, error };
    lab::sweep()?;
    let mut warned = BTreeSet::new();
    let mut expected = Vec::new();
    for (i, step) in scenario.steps.iter().enumerate() {
        let staging = work.join("steps").join(i.to_string());
        expected.push(load_step(step, &staging, scenario, &mut warned)?);
    }
    let everything = union(&expected);
    let lab = Lab::build(&everything, &LabOptions::default())?;
    let wire = lab.wire_ip();
    println!(
        "lab {}: wire {wire} on {}, {} nodes, {} pods (namespaces {}-*)",
        lab.prefix(),
        lab.segment(),
        lab.nodes().len(),
        lab.pods().len(),
        lab.prefix()
    );
    for skipped in lab.skipped() {
        println!("  not in the lab: {skipped}");
    }

    // The development PKI: a root per trust domain, the CAs' serving certificates, a token per
    // node, and every root as a trust bundle.
    let pki = work.join("pki");
    let bundles = work.join("bundles");
    std::fs::create_dir_all(&bundles).map_err(io(format!("{}", bundles.display())))?;
    let mut domains: BTreeMap<String, TrustDomainFiles> = BTreeMap::new();
    let mut cluster_domains: BTreeMap<ClusterId, String> = BTreeMap::new();
    let mut node_tokens: BTreeMap<(ClusterId, String), PathBuf> = BTreeMap::new();
    for (id, cluster) in &everything.clusters {
        let td = trust_domain_for(id, cluster.settings.trust_domain.as_deref())?;
        cluster_domains.insert(id.clone(), td.to_string());
        if !domains.contains_key(td.as_str()) {
            let written = dev_pki::generate(&pki, &td, 0, false)?;
            let bundle = bundles.join(format!("{td}.pem"));
            std::fs::copy(written.dir.join("root.pem"), &bundle)
                .map_err(io(format!("{}", bundle.display())))?;
            domains.insert(
                td.to_string(),
                TrustDomainFiles {
                    tokens: written.dir.join("lab-tokens"),
                    dir: written.dir,
                },
            );
        }
    }
    for (td, files) in &domains {
        let mut lines = String::from("# TOKEN NODE: the lab's nodes\n");
        for node in lab.nodes() {
            if cluster_domains.get(&node.cluster) != Some(td) {
                continue;
            }
            let token = uuid::Uuid::new_v4().simple().to_string();
            let file = files
                .dir
                .join(format!("{}.{}.token", node.cluster, node.name));
            std::fs::write(&file, &token).map_err(io(format!("{}", file.display())))?;
            lines.push_str(&format!("{token} {}\n", node.name));
            node_tokens.insert((node.cluster.clone(), node.name.clone()), file);
        }
        std::fs::write(&files.tokens, lines).map_err(io(format!("{}", files.tokens.display())))?;
    }

    // The tracker follows the clusterset directory, where each step is written in turn.
    let clusters_dir = work.join("clusters");
    write_step(&clusters_dir, None, &scenario.steps[0])?;
    let log_filter = child_log_filter();
    let tracker_url = format!("http://{wire}:{TRACKER_PORT}");
    let tracker_admin = SocketAddr::new(IpAddr::V4(wire), TRACKER_ADMIN_PORT);
    let mut command = Command::new(weft);
    command
        .env("RUST_LOG", &log_filter)
        .arg("tracker")
        .arg("--clusters")
        .arg(&clusters_dir)
        .args(["--insecure", "--listen"])
        .arg(format!("{wire}:{TRACKER_PORT}"))
        .arg("--admin")
        .arg(tracker_admin.to_string())
        .args(["--debounce-ms", &DEBOUNCE.as_millis().to_string()]);
    let tracker = lab.spawn(lab.wire(), "weft tracker", &command)?;
    wait_ready(
        &lab,
        &tracker,
        lab.wire(),
        tracker_admin,
        "/readyz",
        timeout,
    )
    .await?;

    let mut cas = BTreeMap::new();
    for (i, (id, td)) in cluster_domains.iter().enumerate() {
        if !lab.nodes().iter().any(|n| &n.cluster == id) {
            continue;
        }
        let files = &domains[td];
        let offset = u16::try_from(i * 2).unwrap_or(u16::MAX - CA_FIRST_PORT);
        let listen = SocketAddr::new(IpAddr::V4(wire), CA_FIRST_PORT.saturating_add(offset));
        let admin = SocketAddr::new(IpAddr::V4(wire), listen.port().saturating_add(1));
        let mut command = Command::new(weft);
        command
            .env("RUST_LOG", &log_filter)
            .args(["ca", "--cluster", id.as_str(), "--trust-domain", td])
            .arg("--ca-cert")
            .arg(files.dir.join("root.pem"))
            .arg("--ca-key")
            .arg(files.dir.join("root-key.pem"))
            .arg("--serving-cert")
            .arg(files.dir.join("ca.pem"))
            .arg("--serving-key")
            .arg(files.dir.join("ca-key.pem"))
            .arg("--bootstrap-tokens")
            .arg(&files.tokens)
            .args(["--tracker", &tracker_url, "--insecure", "--listen"])
            .arg(listen.to_string())
            .arg("--admin")
            .arg(admin.to_string());
        let ca = lab.spawn(lab.wire(), &format!("weft ca {id}"), &command)?;
        cas.insert(id.clone(), (ca, listen, admin));
    }
    for (ca, _, admin) in cas.values() {
        wait_ready(&lab, ca, lab.wire(), *admin, "/readyz", timeout).await?;
    }

    let mut nodes = Vec::new();
    for node in lab.nodes() {
        let Some((_, ca, _)) = cas.get(&node.cluster) else {
            continue;
        };
        let td = &cluster_domains[&node.cluster];
        let mut command = Command::new(weft);
        command
            .env("RUST_LOG", format!("{log_filter},weft::decision=info"))
            .args(["--log-format", "json", "node"])
            .args(["--cluster", node.cluster.as_str(), "--node", &node.name])
            .args(["--tracker", &tracker_url, "--insecure"])
            .arg("--ca")
            .arg(format!("https://{ca}"))
            .arg("--ca-root")
            .arg(domains[td].dir.join("root.pem"))
            // The development PKI's serving certificates name localhost; the CA listens on
            // the wire.
            .args(["--ca-server-name", "localhost"])
            .arg("--token-file")
            .arg(&node_tokens[&(node.cluster.clone(), node.name.clone())])
            .arg("--bundles")
            .arg(&bundles);
        let process = lab.spawn(
            &node.netns,
            &format!("weft node {}/{}", node.cluster, node.name),
            &command,
        )?;
        nodes.push(RunningNode { node, process });
    }

    let probes = resolve_probes(&lab, &expected)?;
    for pod in lab.pods() {
        let mut ports: BTreeSet<u16> = pod.tcp_ports.iter().copied().collect();
        ports.extend(
            probes
                .iter()
                .filter_map(|p| p.as_ref().ok())
                .filter(|p| std::ptr::eq(p.to, pod))
                .map(|p| p.port),
        );
        for port in ports {
            let addr = SocketAddr::new(IpAddr::V4(pod.ip), port);
            lab.serve_responder(&pod.netns, addr, &pod.key())?;
        }
    }
    let outside: BTreeSet<Ipv4Addr> = probes
        .iter()
        .filter_map(|p| match p {
            Ok(ResolvedProbe {
                from: Source::Outside(ip),
                ..
            }) if *ip != wire => Some(*ip),
            _ => None,
        })
        .collect();
    for ip in outside {
        lab.wire()
            .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
    }

    let mut tally = Tally::default();
    let mut revision = tracker_revision(&lab, tracker_admin).await?;
    for (i, (step, expect)) in scenario.steps.iter().zip(&expected).enumerate() {
        if i > 0 {
            let previous = &scenario.steps[i - 1];
            write_step(&clusters_dir, Some(previous), step)?;
            if expected[i - 1].clusterset != expect.clusterset {
                revision =
                    applied_revision(&lab, &tracker, tracker_admin, revision, timeout).await?;
            }
        }
        let policies = step_policies(&expect.clusterset);
        println!();
        println!(
            "== step {}/{}: {} — policies: {}",
            i + 1,
            scenario.steps.len(),
            step.name,
            if policies.is_empty() {
                "none".to_owned()
            } else {
                policies
                    .iter()
                    .map(|p| format!("{} {}/{}/{}", p.kind, p.cluster, p.namespace, p.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        for node in &nodes {
            wait_node(&lab, node, &expect.clusterset, revision, timeout).await?;
        }
        for (n, (outcome, probe)) in expect.outcomes.iter().zip(&probes).enumerate() {
            let header = format!(
                "{} -> {} {}/{}",
                outcome.from, outcome.to, outcome.port, outcome.protocol
            );
            let probe = match probe {
                Ok(probe) => probe,
                Err(why) => {
                    println!("  [skip] {header}: {why}; not probed");
                    tally.skipped += 1;
                    continue;
                }
            };
            let line = format!("weft demo step {} probe {}", i + 1, n + 1);
            let observed = run_probe(&lab, &nodes, probe, &line).await;
            tally.count(outcome.verdict, observed.allowed);
            print_probe(&header, outcome, &observed);
        }
    }
    println!();
    println!(
        "{} probes made: {} as expected, {} not; {} not probed",
        tally.matched + tally.differed,
        tally.matched,
        tally.differed,
        tally.skipped
    );
    Ok(if tally.differed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The demo's children log at the demo's level (RUST_LOG, else info).
fn child_log_filter() -> String {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| "info".to_owned())
}

#[derive(Debug, Default)]
struct Tally {
    matched: usize,
    differed: usize,
    skipped: usize,
}

impl Tally {
    fn count(&mut self, expected: Verdict, allowed: bool) {
        if (expected == Verdict::Allow) == allowed {
            self.matched += 1;
        } else {
            self.differed += 1;
        }
    }
}

/// Where a probe is made from.
#[derive(Debug)]
enum Source<'lab> {
    /// A pod's namespace.
    Pod(&'lab LabPod),
    /// A node's namespace (a host-network source).
    Node(&'lab LabNode),
    /// The wire, from an address outside every cluster added there.
    Outside(Ipv4Addr),
}

/// A probe as the lab makes it.
#[derive(Debug)]
struct ResolvedProbe<'lab> {
    from: Source<'lab>,
    to: &'lab LabPod,
    port: u16,
}

/// Every probe of the file, placed in the lab, or why it cannot be made there.
fn resolve_probes<'lab>(
    lab: &'lab Lab,
    expected: &[Expected],
) -> Result<Vec<Result<ResolvedProbe<'lab>, String>>, DemoError> {
    let Some(first) = expected.first() else {
        return Ok(Vec::new());
    };
    Ok(first
        .outcomes
        .iter()
        .map(|o| {
            if !o.protocol.eq_ignore_ascii_case("tcp") {
                return Err(format!("{}: only TCP is probed", o.protocol));
            }
            let port = o
                .port
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| format!("port {}", o.port))?;
            let from = match place(lab, &o.from)? {
                Place::Pod(pod) => Source::Pod(pod),
                Place::Node(node) => Source::Node(node),
                Place::Outside(ip) => Source::Outside(ip),
            };
            let to = match place(lab, &o.to)? {
                Place::Pod(pod) => pod,
                Place::Node(_) | Place::Outside(_) => {
                    return Err(format!("{} is not a pod of the lab", o.to));
                }
            };
            Ok(ResolvedProbe { from, to, port })
        })
        .collect())
}

enum Place<'lab> {
    Pod(&'lab LabPod),
    Node(&'lab LabNode),
    Outside(Ipv4Addr),
}

/// Where `end` (`cluster/namespace/pod` or an address) is in the lab.
fn place<'lab>(lab: &'lab Lab, end: &str) -> Result<Place<'lab>, String> {
    if let Ok(ip) = end.parse::<IpAddr>() {
        let IpAddr::V4(v4) = ip.to_canonical() else {
            return Err(format!("{end}: IPv6 is not probed"));
        };
        if let Some(pod) = lab.pod_at(IpAddr::V4(v4)) {
            return Ok(Place::Pod(pod));
        }
        if let Some(node) = lab.nodes().iter().find(|n| n.ip == v4) {
            return Ok(Place::Node(node));
        }
        return Ok(Place::Outside(v4));
    }
    let mut parts = end.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(c), Some(ns), Some(name)) => lab.pod(c, ns, name).map(Place::Pod).ok_or_else(|| {
            format!("{end} has no namespace in the lab (host network, or not scheduled)")
        }),
        _ => Err(format!("{end}: not a pod or an address")),
    }
}

/// What a probe saw.
struct Observed {
    allowed: bool,
    exchange: lab::Exchange,
    decisions: Vec<(String, DecisionLine)>,
}

async fn run_probe(
    lab: &Lab,
    nodes: &[RunningNode<'_>],
    probe: &ResolvedProbe<'_>,
    line: &str,
) -> Observed {
    let to = SocketAddr::new(IpAddr::V4(probe.to.ip), probe.port);
    let (netns, from, source_ip) = match &probe.from {
        Source::Pod(pod) => (&pod.netns, None, pod.ip),
        Source::Node(node) => (&node.netns, None, node.ip),
        Source::Outside(ip) => (lab.wire(), Some(IpAddr::V4(*ip)), *ip),
    };
    let marks: Vec<usize> = nodes.iter().map(|n| n.process.output().mark()).collect();
    let exchange = lab::exchange(netns, from, to, line, PROBE_TIMEOUT).await;
    let about = |d: &DecisionLine| {
        d.destination == to.to_string()
            && d.source
                .parse::<SocketAddr>()
                .is_ok_and(|s| s.ip() == IpAddr::V4(source_ip))
    };
    let collect = || {
        nodes
            .iter()
            .zip(&marks)
            .flat_map(|(n, mark)| {
                n.process
                    .output()
                    .since(*mark)
                    .into_iter()
                    .filter_map(|line| decision_line(&line))
                    .filter(|d| about(d))
                    .map(|d| (n.node.name.clone(), d))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    // Nodes log a decision before they pass or close the connection, but their lines reach
    // the demo through pipes: give them a moment.
    let deadline = tokio::time::Instant::now() + DECISION_WAIT;
    while collect().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    Observed {
        allowed: exchange.outcome.allowed(),
        exchange,
        decisions: collect(),
    }
}

fn print_probe(header: &str, outcome: &Outcome, observed: &Observed) {
    let expected = outcome.verdict;
    let seen = if observed.allowed { "allow" } else { "deny" };
    let ok = (expected == Verdict::Allow) == observed.allowed;
    println!(
        "  [{}] {header}: expected {expected}, observed {seen} ({})",
        if ok { " ok " } else { "DIFF" },
        observed.exchange.outcome
    );
    let engine = if outcome.egress.verdict == Verdict::Deny {
        format!("egress {}", outcome.egress)
    } else {
        format!("ingress {}", outcome.ingress)
    };
    println!("         engine: {engine}");
    if observed.decisions.is_empty() {
        println!("         nodes: no decision logged for this connection");
    }
    for (node, d) in &observed.decisions {
        let identity = |id: &str| {
            if id.is_empty() {
                "(none)".to_owned()
            } else {
                id.to_owned()
            }
        };
        println!(
            "         {node} {}: {} by {}: {}; identities {} -> {}",
            d.direction,
            d.verdict,
            d.layer,
            d.reason,
            identity(&d.source_identity),
            identity(&d.destination_identity)
        );
    }
}

/// The NetworkPolicies and IdentityPolicies of every cluster of a step.
fn step_policies(clusterset: &ClusterSet) -> Vec<PolicyName> {
    let mut names: Vec<PolicyName> = clusterset
        .policies()
        .map(|p| PolicyName {
            kind: "NetworkPolicy".into(),
            cluster: p.cluster.to_string(),
            namespace: p.namespace.clone(),
            name: p.name.clone(),
        })
        .chain(clusterset.identity_policies().map(|p| PolicyName {
            kind: "IdentityPolicy".into(),
            cluster: p.cluster.to_string(),
            namespace: p.namespace.clone(),
            name: p.name.clone(),
        }))
        .collect();
    names.sort();
    names
}

/// Fails with the process's last lines if it has exited.
fn check_alive(lab: &Lab, process: &Process) -> Result<(), DemoError> {
    match lab.exit_status(process) {
        None => Ok(()),
        Some(status) => Err(DemoError::Exited {
            name: process.name().to_owned(),
            status: status.to_string(),
            tail: process.output().tail(20).join("\n"),
        }),
    }
}

/// Waits for `GET path` at `addr` in `netns` to answer 200.
async fn wait_ready(
    lab: &Lab,
    process: &Process,
    netns: &lab::Netns,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(), DemoError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last;
    loop {
        check_alive(lab, process)?;
        match lab::http_get(netns, addr, path, POLL * 10).await {
            Ok(answer) if answer.status == 200 => return Ok(()),
            Ok(answer) => last = String::from_utf8_lossy(&answer.body).trim().to_owned(),
            Err(e) => last = e.to_string(),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DemoError::NotReady {
                what: process.name().to_owned(),
                timeout,
                detail: last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The tracker's revision, from its metrics.
async fn tracker_revision(lab: &Lab, admin: SocketAddr) -> Result<u64, DemoError> {
    let answer = lab::http_get(lab.wire(), admin, "/metrics", POLL * 10).await?;
    let text = String::from_utf8_lossy(&answer.body);
    Ok(text
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("weft_tracker_revision"))
                .then(|| words.next().and_then(|v| v.parse().ok()))
                .flatten()
        })
        .unwrap_or(0))
}

/// Waits for the tracker to apply a step's change: its revision moves past `before`, then
/// stays still (the directory is read again after each burst of file events).
async fn applied_revision(
    lab: &Lab,
    tracker: &Process,
    admin: SocketAddr,
    before: u64,
    timeout: Duration,
) -> Result<u64, DemoError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = before;
    let mut still_since = tokio::time::Instant::now();
    loop {
        check_alive(lab, tracker)?;
        let now_at = tracker_revision(lab, admin).await?;
        if now_at != last {
            last = now_at;
            still_since = tokio::time::Instant::now();
        } else if last > before && still_since.elapsed() >= SETTLED {
            return Ok(last);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DemoError::NotReady {
                what: "weft tracker".into(),
                timeout,
                detail: format!("its revision stayed at {before} after the step was written"),
            });
        }
        tokio::time::sleep(DEBOUNCE).await;
    }
}

/// Waits for `node` to be ready at `revision` with exactly the step's policies of its cluster.
async fn wait_node(
    lab: &Lab,
    node: &RunningNode<'_>,
    clusterset: &ClusterSet,
    revision: u64,
    timeout: Duration,
) -> Result<(), DemoError> {
    let want: Vec<PolicyName> = step_policies(clusterset)
        .into_iter()
        .filter(|p| p.cluster == node.node.cluster.as_str())
        .collect();
    let deadline = tokio::time::Instant::now() + timeout;
    let readiness = SocketAddr::new(IpAddr::V4(node.node.ip), NODE_READINESS_PORT);
    let mut last;
    loop {
        check_alive(lab, &node.process)?;
        match lab::http_get(&node.node.netns, NODE_ADMIN, "/config_dump", POLL * 10).await {
            Ok(answer) if answer.status == 200 => {
                match serde_json::from_slice::<ConfigDump>(&answer.body) {
                    Ok(mut dump) => {
                        dump.policies.sort();
                        if !dump.ready {
                            last = format!(
                                "not ready: {}",
                                dump.not_ready_because
                                    .as_deref()
                                    .unwrap_or("(no reason given)")
                            );
                        } else if dump.revision < revision {
                            last =
                                format!("at revision {}, the step is at {revision}", dump.revision);
                        } else if dump.policies != want {
                            last = format!("has policies {:?}, the step {:?}", dump.policies, want);
                        } else {
                            // The readiness endpoint, as a kubelet would ask it.
                            match lab::http_get(lab.wire(), readiness, "/healthz/ready", POLL * 10)
                                .await
                            {
                                Ok(ready) if ready.status == 200 => return Ok(()),
                                Ok(ready) => {
                                    last = format!(
                                        "/healthz/ready answers {}: {}",
                                        ready.status,
                                        String::from_utf8_lossy(&ready.body).trim()
                                    );
                                }
                                Err(e) => last = e.to_string(),
                            }
                        }
                    }
                    Err(e) => last = format!("/config_dump: {e}"),
                }
            }
            Ok(answer) => last = format!("/config_dump answers {}", answer.status),
            Err(e) => last = e.to_string(),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DemoError::NotReady {
                what: node.process.name().to_owned(),
                timeout,
                detail: last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_scenario_is_the_examples_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/two-cluster");
        let from_dir = Scenario::from_dir(&dir).expect("the example is a scenario");
        let built_in = Scenario::built_in();
        assert_eq!(from_dir.probes, built_in.probes);
        let names = |s: &Scenario| s.steps.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&from_dir), names(&built_in));
        for (a, b) in from_dir.steps.iter().zip(&built_in.steps) {
            assert_eq!(a.files, b.files, "step {}", a.name);
        }
        // One step given as a clusterset.
        let one = Scenario::from_dir(&dir.join("1-no-policy"));
        assert!(
            one.as_ref()
                .is_err_and(|e| e.to_string().contains("probes.yaml")),
            "a clusterset needs its probes beside it: {one:?}"
        );
    }

    #[test]
    fn steps_replace_each_other_in_the_trackers_directory() {
        let out = tempfile::tempdir().expect("tempdir");
        let scenario = Scenario::built_in();
        let [one, two, three] = &scenario.steps[..] else {
            panic!("three steps");
        };
        let dir = out.path();
        write_step(dir, None, one).expect("step 1");
        assert!(!dir.join("cluster-2/policy.yaml").exists());
        write_step(dir, Some(one), two).expect("step 2");
        let policy = std::fs::read_to_string(dir.join("cluster-2/policy.yaml")).expect("read");
        assert_eq!(policy, TWO_CLUSTER_DENY);
        write_step(dir, Some(two), three).expect("step 3");
        let policy = std::fs::read_to_string(dir.join("cluster-2/policy.yaml")).expect("read");
        assert_eq!(policy, TWO_CLUSTER_ALLOW);
        write_step(dir, Some(three), one).expect("back to step 1");
        assert!(!dir.join("cluster-2/policy.yaml").exists());
        let only_c1 = Step {
            name: "c1".into(),
            files: one
                .files
                .iter()
                .filter(|(p, _)| p.starts_with("cluster-1"))
                .map(|(p, c)| (p.clone(), c.clone()))
                .collect(),
            origin: None,
        };
        write_step(dir, Some(one), &only_c1).expect("cluster-2 leaves");
        assert!(!dir.join("cluster-2").exists());
        let hidden: Vec<_> = visible_entries(&dir.join("cluster-1")).expect("ls");
        assert_eq!(
            hidden,
            [dir.join("cluster-1/demo.yaml")],
            "no staging file left"
        );
    }

    #[test]
    fn decision_lines_are_read_from_the_json_log() {
        let line = r#"{"timestamp":"2026-11-29T17:00:00Z","level":"INFO","fields":{"message":"decision","direction":"inbound","source":"10.1.1.20:40000","destination":"10.2.1.10:80","source_pod":"cluster-1/demo-c1/tmp-client","destination_pod":"cluster-2/demo-c2/web-c2","source_identity":"spiffe://cluster-1/ns/demo-c1/sa/default","destination_identity":"spiffe://cluster-2/ns/demo-c2/sa/default","verdict":"allow","layer":"networkpolicy","reason":"allowed by cluster-2/demo-c2/default-deny-ingress rule 0"},"target":"weft::decision"}"#;
        let d = decision_line(line).expect("a decision");
        assert_eq!(
            (d.direction.as_str(), d.verdict.as_str()),
            ("inbound", "allow")
        );
        assert_eq!(d.destination, "10.2.1.10:80");
        assert!(decision_line(&line.replace("weft::decision", "weft::node")).is_none());
        assert!(decision_line("not json").is_none());
    }
}
