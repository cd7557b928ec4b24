//! The demo's control plane and node agents: the development PKI, `weft tracker` and a
//! `weft ca` per cluster on the wire, `weft node` in every node's namespace, and waiting for
//! each to be ready — for a step, at its revision with its policies.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

use super::DemoError;
use super::scenario::{Step, write_step};
use crate::ca::dev_pki;
use crate::identity::trust_domain_for;
use crate::lab::{self, Lab, LabNode, Process};
use crate::model::{ClusterId, ClusterSet};

/// The tracker's gRPC port on the wire.
pub const TRACKER_PORT: u16 = 19090;
/// The tracker's admin port on the wire.
const TRACKER_ADMIN_PORT: u16 = 19091;
/// The first CA's gRPC port on the wire; CA `i` listens at `+ 2i`, its admin endpoint one up.
const CA_FIRST_PORT: u16 = 19443;
/// Where a node's readiness endpoint answers (on the node's address).
const NODE_READINESS_PORT: u16 = 15021;
/// Where a node's admin endpoint answers (its namespace's loopback).
const NODE_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
/// How often readiness is polled, and how long one answer may take.
const POLL: Duration = Duration::from_millis(100);
const ANSWER: Duration = Duration::from_secs(1);
/// The tracker's debounce of the clusterset directory.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// How long the tracker's revision must stay still before a step's change counts as applied.
const SETTLED: Duration = Duration::from_millis(300);

/// The PKI of one trust domain, in the demo's directory.
struct TrustDomainFiles {
    dir: PathBuf,
    /// The CA's bootstrap tokens file, `TOKEN NODE` for the lab's nodes of its cluster.
    tokens: PathBuf,
}

/// A running `weft node`.
pub struct RunningNode<'lab> {
    /// Its node.
    pub node: &'lab LabNode,
    /// Its process, with its decision log.
    pub process: Process,
    /// How it was started, to start it again ([`ControlPlane::start_node`]).
    command: Command,
}

/// Extra arguments for the processes a [`ControlPlane`] starts; none by default.
#[derive(Debug, Clone, Default)]
pub struct PlaneOptions {
    /// Appended to every `weft ca`'s command line (e.g. `--min-ttl 4s`).
    pub ca_args: Vec<String>,
    /// Appended to every `weft node`'s command line (e.g. `--certificate-ttl 4s`).
    pub node_args: Vec<String>,
    /// The node agents' own copy of the binary, if not the control plane's: a node runs only
    /// its agent, and pages of a file another process touched count in every mapper's RSS.
    pub node_binary: Option<PathBuf>,
}

/// How [`ControlPlane::stop_node`] stops an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM, as a DaemonSet's pod is stopped; SIGKILL if it has not exited after the grace.
    Terminate {
        /// How long it may take to exit.
        grace: Duration,
    },
    /// SIGKILL (kill -9): no chance to clean up.
    Kill,
}

/// The tracker, the CAs and the node agents, running in a lab.
pub struct ControlPlane<'lab> {
    lab: &'lab Lab,
    /// The clusterset directory the tracker follows.
    clusters: PathBuf,
    tracker: Process,
    tracker_admin: SocketAddr,
    /// The node agents, one per node of the lab.
    pub nodes: Vec<RunningNode<'lab>>,
    timeout: Duration,
}

impl<'lab> ControlPlane<'lab> {
    /// Writes the development PKI into `work` (a root per trust domain, the CAs' serving
    /// certificates, a token per node, every root as a trust bundle), then starts the
    /// tracker on `first` step's manifests, a CA per cluster that has nodes, and a node agent
    /// per node; each of `weft`'s control-plane processes is waited for up to `timeout`.
    pub async fn start(
        lab: &'lab Lab,
        weft: &Path,
        work: &Path,
        clusterset: &ClusterSet,
        first: &Step,
        timeout: Duration,
    ) -> Result<Self, DemoError> {
        let options = PlaneOptions::default();
        Self::start_with(lab, weft, work, clusterset, first, timeout, &options).await
    }

    /// [`ControlPlane::start`] with `options`' extra arguments for the CAs and node agents.
    pub async fn start_with(
        lab: &'lab Lab,
        weft: &Path,
        work: &Path,
        clusterset: &ClusterSet,
        first: &Step,
        timeout: Duration,
        options: &PlaneOptions,
    ) -> Result<Self, DemoError> {
        let io = |what: &Path| {
            let what = what.display().to_string();
            move |error| DemoError::Io { what, error }
        };
        let pki = work.join("pki");
        let bundles = work.join("bundles");
        std::fs::create_dir_all(&bundles).map_err(io(&bundles))?;
        let mut domains: BTreeMap<String, TrustDomainFiles> = BTreeMap::new();
        let mut cluster_domains: BTreeMap<ClusterId, String> = BTreeMap::new();
        for (id, cluster) in &clusterset.clusters {
            let td = trust_domain_for(id, cluster.settings.trust_domain.as_deref())?;
            cluster_domains.insert(id.clone(), td.to_string());
            if !domains.contains_key(td.as_str()) {
                let written = dev_pki::generate(&pki, &td, 0, &[], false)?;
                let bundle = bundles.join(format!("{td}.pem"));
                std::fs::copy(written.dir.join("root.pem"), &bundle).map_err(io(&bundle))?;
                domains.insert(
                    td.to_string(),
                    TrustDomainFiles {
                        tokens: written.dir.join("lab-tokens"),
                        dir: written.dir,
                    },
                );
            }
        }
        // dev_pki's tokens name generic nodes: the CAs get the lab's nodes' own.
        let mut node_tokens: BTreeMap<(ClusterId, String), PathBuf> = BTreeMap::new();
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
                std::fs::write(&file, &token).map_err(io(&file))?;
                lines.push_str(&format!("{token} {}\n", node.name));
                node_tokens.insert((node.cluster.clone(), node.name.clone()), file);
            }
            std::fs::write(&files.tokens, lines).map_err(io(&files.tokens))?;
        }

        let wire = lab.wire_ip();
        let clusters = work.join("clusters");
        write_step(&clusters, None, first)?;
        let log_filter = child_log_filter();
        let tracker_url = format!("http://{wire}:{TRACKER_PORT}");
        let tracker_admin = SocketAddr::new(IpAddr::V4(wire), TRACKER_ADMIN_PORT);
        let mut command = Command::new(weft);
        command
            .env("RUST_LOG", &log_filter)
            .arg("tracker")
            .arg("--clusters")
            .arg(&clusters)
            .args(["--insecure", "--listen"])
            .arg(format!("{wire}:{TRACKER_PORT}"))
            .arg("--admin")
            .arg(tracker_admin.to_string())
            .args(["--debounce-ms", &DEBOUNCE.as_millis().to_string()]);
        let tracker = lab.spawn(lab.wire(), "weft tracker", &command)?;
        wait_ready(lab, &tracker, tracker_admin, timeout).await?;

        let mut cas = BTreeMap::new();
        for (i, (id, td)) in cluster_domains.iter().enumerate() {
            if !lab.nodes().iter().any(|n| &n.cluster == id) {
                continue;
            }
            let files = &domains[td];
            let offset = u16::try_from(i * 2).unwrap_or(u16::MAX);
            let port = CA_FIRST_PORT.saturating_add(offset);
            let listen = SocketAddr::new(IpAddr::V4(wire), port);
            let admin = SocketAddr::new(IpAddr::V4(wire), port.saturating_add(1));
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
                .arg(admin.to_string())
                .args(&options.ca_args);
            let ca = lab.spawn(lab.wire(), &format!("weft ca {id}"), &command)?;
            cas.insert(id.clone(), (ca, listen, admin));
        }
        for (ca, _, admin) in cas.values() {
            wait_ready(lab, ca, *admin, timeout).await?;
        }

        let mut nodes = Vec::new();
        for node in lab.nodes() {
            let (Some((_, ca, _)), Some(td), Some(token)) = (
                cas.get(&node.cluster),
                cluster_domains.get(&node.cluster),
                node_tokens.get(&(node.cluster.clone(), node.name.clone())),
            ) else {
                continue;
            };
            let mut command = Command::new(options.node_binary.as_deref().unwrap_or(weft));
            command
                .env("RUST_LOG", format!("{log_filter},weft::decision=info"))
                .args(["--log-format", "json", "node"])
                .args(["--cluster", node.cluster.as_str(), "--node", &node.name])
                .args(["--tracker", &tracker_url, "--insecure"])
                .arg("--ca")
                .arg(format!("https://{ca}"))
                .arg("--ca-root")
                .arg(domains[td].dir.join("root.pem"))
                // The development PKI's serving certificates name localhost; the CA listens
                // on the wire.
                .args(["--ca-server-name", "localhost"])
                .arg("--token-file")
                .arg(token)
                .arg("--bundles")
                .arg(&bundles)
                .args(["--pod-interfaces", crate::lab::POD_INTERFACES])
                .args(&options.node_args);
            let process = lab.spawn(
                &node.netns,
                &format!("weft node {}/{}", node.cluster, node.name),
                &command,
            )?;
            nodes.push(RunningNode {
                node,
                process,
                command,
            });
        }
        Ok(Self {
            lab,
            clusters,
            tracker,
            tracker_admin,
            nodes,
            timeout,
        })
    }

    /// The tracker's revision, from its metrics.
    pub async fn revision(&self) -> Result<u64, DemoError> {
        let answer = lab::http_get(self.lab.wire(), self.tracker_admin, "/metrics", ANSWER).await?;
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

    /// Hands `step` to the tracker in place of `previous`; when `changed`, waits for the
    /// tracker to apply it: its revision moves past `before`, then stays still (the directory
    /// is read again after each burst of file events). Returns the revision the step is at.
    pub async fn next_step(
        &self,
        previous: &Step,
        step: &Step,
        changed: bool,
        before: u64,
    ) -> Result<u64, DemoError> {
        write_step(&self.clusters, Some(previous), step)?;
        if !changed {
            return Ok(before);
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut last = before;
        let mut still_since = tokio::time::Instant::now();
        loop {
            check_alive(self.lab, &self.tracker)?;
            let now_at = self.revision().await?;
            if now_at != last {
                last = now_at;
                still_since = tokio::time::Instant::now();
            } else if last > before && still_since.elapsed() >= SETTLED {
                return Ok(last);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DemoError::NotReady {
                    what: "weft tracker".into(),
                    timeout: self.timeout,
                    detail: format!("its revision stayed at {before} after the step was written"),
                });
            }
            tokio::time::sleep(DEBOUNCE).await;
        }
    }

    /// Stops node agent `index` (of [`ControlPlane::nodes`]) as `how` says and waits for it
    /// to be gone; how it ended, if it exited by itself. Panics if there is no agent `index`.
    pub async fn stop_node(&self, index: usize, how: Stop) -> Option<std::process::ExitStatus> {
        let process = &self.nodes[index].process;
        match how {
            Stop::Terminate { grace } => self.lab.terminate(process, grace).await,
            Stop::Kill => {
                self.lab.kill(process).await;
                None
            }
        }
    }

    /// Starts node agent `index` again with the command line it was first started with (after
    /// [`ControlPlane::stop_node`]); does not wait for it to be ready
    /// ([`ControlPlane::wait_nodes`] does). Panics if there is no agent `index`.
    pub fn start_node(&mut self, index: usize) -> Result<(), DemoError> {
        let running = &mut self.nodes[index];
        let name = running.process.name().to_owned();
        running.process = self
            .lab
            .spawn(&running.node.netns, &name, &running.command)?;
        Ok(())
    }

    /// Waits for every node agent to be ready at `revision` with exactly `clusterset`'s
    /// policies of its cluster.
    pub async fn wait_nodes(
        &self,
        clusterset: &ClusterSet,
        revision: u64,
    ) -> Result<(), DemoError> {
        for node in &self.nodes {
            wait_node(self.lab, node, clusterset, revision, self.timeout).await?;
        }
        Ok(())
    }
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

/// A policy as `/config_dump` names it.
#[derive(Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyName {
    /// `NetworkPolicy` or `IdentityPolicy`.
    pub kind: String,
    /// Its cluster.
    pub cluster: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// The demo's children log at the demo's level (RUST_LOG, else info).
fn child_log_filter() -> String {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| "info".to_owned())
}

/// The NetworkPolicies and IdentityPolicies of every cluster of a step.
pub fn step_policies(clusterset: &ClusterSet) -> Vec<PolicyName> {
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

/// Polls `settled` until it is `Ok`, failing when `process` exits or after `timeout` with
/// the last thing `settled` said.
async fn wait_until(
    lab: &Lab,
    process: &Process,
    timeout: Duration,
    mut settled: impl AsyncFnMut() -> Result<(), String>,
) -> Result<(), DemoError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        check_alive(lab, process)?;
        let last = match settled().await {
            Ok(()) => return Ok(()),
            Err(last) => last,
        };
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

/// Waits for `GET /readyz` of a control-plane process, at `admin` on the wire, to answer 200.
async fn wait_ready(
    lab: &Lab,
    process: &Process,
    admin: SocketAddr,
    timeout: Duration,
) -> Result<(), DemoError> {
    wait_until(lab, process, timeout, async || {
        let answer = lab::http_get(lab.wire(), admin, "/readyz", ANSWER)
            .await
            .map_err(|e| e.to_string())?;
        match answer.status {
            200 => Ok(()),
            _ => Err(String::from_utf8_lossy(&answer.body).trim().to_owned()),
        }
    })
    .await
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
    let readiness = SocketAddr::new(IpAddr::V4(node.node.ip), NODE_READINESS_PORT);
    wait_until(lab, &node.process, timeout, async || {
        let answer = lab::http_get(&node.node.netns, NODE_ADMIN, "/config_dump", ANSWER)
            .await
            .map_err(|e| e.to_string())?;
        if answer.status != 200 {
            return Err(format!("/config_dump answers {}", answer.status));
        }
        let mut dump: ConfigDump =
            serde_json::from_slice(&answer.body).map_err(|e| format!("/config_dump: {e}"))?;
        dump.policies.sort();
        if !dump.ready {
            return Err(format!(
                "not ready: {}",
                dump.not_ready_because
                    .as_deref()
                    .unwrap_or("(no reason given)")
            ));
        }
        if dump.revision < revision {
            return Err(format!(
                "at revision {}, the step is at {revision}",
                dump.revision
            ));
        }
        if dump.policies != want {
            return Err(format!(
                "has policies {:?}, the step {want:?}",
                dump.policies
            ));
        }
        // The readiness endpoint too, as a kubelet would ask it.
        let ready = lab::http_get(lab.wire(), readiness, "/healthz/ready", ANSWER)
            .await
            .map_err(|e| e.to_string())?;
        match ready.status {
            200 => Ok(()),
            status => Err(format!(
                "/healthz/ready answers {status}: {}",
                String::from_utf8_lossy(&ready.body).trim()
            )),
        }
    })
    .await
}
