//! `weft demo`: the whole system on one machine. A scenario (the seed's two-cluster demo, built
//! in, or a directory) becomes a [`lab`] of network namespaces; a tracker, a CA per cluster and
//! a `weft node` per node run inside it; then, step by step, the step's manifests are handed
//! to the tracker and every probe is made with real TCP from its source pod, its verdict
//! compared with the offline engine's and explained from the nodes' decision logs.

pub mod plane;
mod probing;
pub mod scenario;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::ca::dev_pki::DevPkiError;
use crate::identity::IdError;
use crate::lab::{self, Lab, LabError, LabOptions};
use crate::model::ClusterSet;
use crate::model::loader::{self, LoadError};
use crate::policy::Engine;
use crate::probe::{self, Outcome, ProbeError};
use plane::ControlPlane;
use probing::Probes;
use scenario::{Scenario, Step, write_step};

/// The name of the demo's temporary directory: then its process id, so that a later run can
/// tell a dead run's.
const WORK_PREFIX: &str = "weft-demo-";

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
    // The children run this very executable: through /proc, a binary rebuilt at the same path
    // while the demo runs (`cargo build`) is not mixed into it.
    let weft = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
    if !weft.exists() {
        return Err(DemoError::Io {
            what: format!("{}: the running executable", weft.display()),
            error: std::io::ErrorKind::NotFound.into(),
        });
    }
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

async fn demo(
    scenario: &Scenario,
    weft: &Path,
    work: &Path,
    timeout: Duration,
) -> Result<ExitCode, DemoError> {
    lab::sweep()?;
    let mut warned = BTreeSet::new();
    let mut expected = Vec::new();
    for (i, step) in scenario.steps.iter().enumerate() {
        let staging = work.join("steps").join(i.to_string());
        expected.push(load_step(step, &staging, scenario, &mut warned)?);
    }
    let (Some(first_step), Some(first)) = (scenario.steps.first(), expected.first()) else {
        return Err(DemoError::Scenario {
            dir: scenario.probes_file.clone(),
            message: "no step".into(),
        });
    };
    let everything = union(&expected);
    let lab = Lab::build(&everything, &LabOptions::default())?;
    println!(
        "lab {}: wire {} on {}, {} nodes, {} pods (namespaces {}-*)",
        lab.prefix(),
        lab.wire_ip(),
        lab.segment(),
        lab.nodes().len(),
        lab.pods().len(),
        lab.prefix()
    );
    for skipped in lab.skipped() {
        println!("  not in the lab: {skipped}");
    }
    let plane = ControlPlane::start(&lab, weft, work, &everything, first_step, timeout).await?;
    let mut probes = Probes::place(&lab, &first.outcomes);
    probes.serve()?;

    let mut revision = plane.revision().await?;
    for (i, (step, expect)) in scenario.steps.iter().zip(&expected).enumerate() {
        if let (Some(previous), Some(before)) = (
            i.checked_sub(1).and_then(|p| scenario.steps.get(p)),
            i.checked_sub(1).and_then(|p| expected.get(p)),
        ) {
            let changed = before.clusterset != expect.clusterset;
            revision = plane.next_step(previous, step, changed, revision).await?;
        }
        let policies = plane::step_policies(&expect.clusterset);
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
        plane.wait_nodes(&expect.clusterset, revision).await?;
        probes.run_step(i + 1, &expect.outcomes, &plane.nodes).await;
    }
    println!();
    Ok(if probes.summary() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
