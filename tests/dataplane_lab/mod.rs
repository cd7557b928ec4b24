//! The data-plane lab the benchmark (`benches/dataplane.rs`) and the tests on the real agents
//! (`tests/dataplane*.rs`) share: two clusters with one node each, a client pod and an `other`
//! pod behind cluster-1's node and a server pod behind cluster-2's, all dual-stack (IPv4 and
//! IPv6), no NetworkPolicy; brought
//! up with `weft demo`'s lab and control plane (the real `weft tracker`, `weft ca` and
//! `weft node`).
#![allow(dead_code)] // each user takes its share

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use weft::demo::plane::{ControlPlane, PlaneOptions, RunningNode};
use weft::demo::scenario::{Step, write_step};
use weft::lab::{ExchangeOutcome, Lab, LabNode, LabOptions, LabPod, Netns, exchange, http_get};
use weft::model::ClusterSet;
use weft::model::loader;

/// The ports the server pod serves over TCP.
pub const SINK_PORT: u16 = 5201;
pub const ECHO_PORT: u16 = 5202;
pub const LINE_PORT: u16 = 5203;
/// The server's UDP ports: `dns` (named) and another.
pub const DNS_PORT: u16 = 5300;
pub const UDP_PORT: u16 = 5301;

/// How long an agent's admin endpoint may take to answer.
const ANSWER: Duration = Duration::from_secs(2);
/// How long a probe's exchange may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

const CLUSTER_1: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: bench
---
apiVersion: v1
kind: Node
metadata:
  name: node-a
status:
  addresses:
    - type: InternalIP
      address: 192.168.1.11
    - type: InternalIP
      address: fd00:192:168:1::11
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: bench
  labels:
    app: client
spec:
  nodeName: node-a
  containers:
    - name: client
      image: busybox
status:
  phase: Running
  podIPs:
    - ip: 10.1.1.10
    - ip: fd00:10:1:1::10
---
apiVersion: v1
kind: Pod
metadata:
  name: other
  namespace: bench
  labels:
    app: other
spec:
  nodeName: node-a
  containers:
    - name: other
      image: busybox
status:
  phase: Running
  podIPs:
    - ip: 10.1.1.12
    - ip: fd00:10:1:1::12
";

const CLUSTER_2: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: bench
---
apiVersion: v1
kind: Node
metadata:
  name: node-b
status:
  addresses:
    - type: InternalIP
      address: 192.168.1.21
    - type: InternalIP
      address: fd00:192:168:1::21
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: bench
  labels:
    app: server
spec:
  nodeName: node-b
  containers:
    - name: server
      image: busybox
      ports:
        - containerPort: 5201
        - containerPort: 5202
        - containerPort: 5203
        - {name: dns, containerPort: 5300, protocol: UDP}
        - {containerPort: 5301, protocol: UDP}
status:
  phase: Running
  podIPs:
    - ip: 10.2.1.10
    - ip: fd00:10:2:1::10
";

/// Denies every ingress to the server (a default deny in its namespace).
const DENY_SERVER: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-all
  namespace: bench
spec:
  podSelector: {}
  policyTypes: [Ingress]
";

/// Admits ingress to the server on [`LINE_PORT`] only: [`ECHO_PORT`] and [`SINK_PORT`] are
/// denied.
const LINE_PORT_ONLY: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: line-port-only
  namespace: bench
spec:
  podSelector:
    matchLabels:
      app: server
  policyTypes: [Ingress]
  ingress:
    - ports:
        - port: 5203
          protocol: TCP
";

/// Picks the server pod: a pod selector, as a YAML flow mapping.
pub const SELECT_SERVER: &str = "{matchLabels: {app: server}}";

/// An item of an ingress rule's `from:` (a YAML flow mapping) that picks cluster-1's
/// `app: client` pods: a namespace selector naming the cluster, for selectors are global.
pub const FROM_CLUSTER_1_CLIENT: &str = "{namespaceSelector: {matchLabels: \
     {cluster.clusterset.k8s.io: cluster-1}}, podSelector: {matchLabels: {app: client}}}";

/// A NetworkPolicy `name` in namespace `bench` on the pods `selector` picks (a YAML flow
/// mapping, `{}` for all of them), the rest of its spec being `spec` (YAML, each line indented
/// here as below `spec:`).
pub fn network_policy(name: &str, selector: &str, spec: &str) -> String {
    let mut policy = format!(
        "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {name}
  namespace: bench
spec:
  podSelector: {selector}
"
    );
    for line in spec.lines() {
        policy.push_str(&format!("  {line}\n"));
    }
    policy
}

/// The topology as a step: with `deny`, the server's namespace denies all ingress.
pub fn step(deny: bool) -> Step {
    if deny {
        step_with("deny", &[("cluster-2/policy.yaml", DENY_SERVER)])
    } else {
        step_with("allow", &[])
    }
}

/// The topology as a step in which the server admits [`LINE_PORT`] and nothing else.
pub fn line_port_only() -> Step {
    step_with(
        "line-port-only",
        &[("cluster-2/policy.yaml", LINE_PORT_ONLY)],
    )
}

/// The topology as a step named `name`, with `manifests` (path below the clusterset, text):
/// policies, more pods.
pub fn step_with(name: &str, manifests: &[(&str, &str)]) -> Step {
    let mut files: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    files.insert("cluster-1/bench.yaml".into(), CLUSTER_1.into());
    files.insert("cluster-2/bench.yaml".into(), CLUSTER_2.into());
    for (path, text) in manifests {
        files.insert((*path).into(), (*text).into());
    }
    Step {
        name: name.into(),
        files,
        origin: None,
    }
}

/// `step` loaded as the tracker will load it (written into `staging` first).
pub fn clusterset(step: &Step, staging: &Path) -> ClusterSet {
    write_step(staging, None, step).expect("the step is written");
    loader::load_clusterset(staging)
        .expect("the topology loads")
        .clusterset
}

/// The lab of the allow step.
pub fn build_lab(work: &Path) -> (Lab, ClusterSet, Step) {
    build_lab_of(work, step(false))
}

/// The lab of `step` (the allow step with more manifests, say).
pub fn build_lab_of(work: &Path, step: Step) -> (Lab, ClusterSet, Step) {
    weft::lab::sweep().expect("sweeping dead labs");
    let set = clusterset(&step, &work.join(format!("staging-{}", step.name)));
    let lab = Lab::build(&set, &LabOptions::default()).expect("the lab is built");
    (lab, set, step)
}

/// Starts the control plane and the node agents on `lab`, and waits for every node to be
/// ready at the tracker's revision.
pub async fn start_plane<'lab>(
    lab: &'lab Lab,
    weft: &Path,
    work: &Path,
    set: &ClusterSet,
    step: &Step,
) -> ControlPlane<'lab> {
    start_plane_with(lab, weft, work, set, step, &PlaneOptions::default()).await
}

/// [`start_plane`] with `options`' extra arguments for the CAs and node agents.
pub async fn start_plane_with<'lab>(
    lab: &'lab Lab,
    weft: &Path,
    work: &Path,
    set: &ClusterSet,
    step: &Step,
    options: &PlaneOptions,
) -> ControlPlane<'lab> {
    let timeout = Duration::from_secs(30);
    let plane = ControlPlane::start_with(lab, weft, work, set, step, timeout, options)
        .await
        .expect("the control plane starts");
    let revision = plane.revision().await.expect("the tracker's revision");
    plane
        .wait_nodes(set, revision)
        .await
        .expect("the nodes are ready");
    plane
}

/// The agent `plane` runs in `node`.
pub fn agent<'p, 'lab>(plane: &'p ControlPlane<'lab>, node: &LabNode) -> &'p RunningNode<'lab> {
    plane
        .nodes
        .iter()
        .find(|n| n.node.name == node.name)
        .expect("the node's agent")
}

/// Drops `lab` and checks that none of its namespaces is left.
pub fn drop_lab(lab: Lab) {
    let prefix = lab.prefix().to_owned();
    drop(lab);
    assert!(Lab::namespaces_of(&prefix).is_empty(), "namespaces left");
}

/// Waits up to 5 s for a line of `agent`'s output since `mark` that holds every one of
/// `parts` (its output reaches the test through a pipe and a reader thread: a line may trail
/// what it tells of); fails showing the lines otherwise.
pub async fn wait_logged(agent: &RunningNode<'_>, mark: usize, parts: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let logged = || {
        let lines = agent.process.output().since(mark);
        let found = lines.iter().any(|l| parts.iter().all(|p| l.contains(p)));
        (found, lines)
    };
    loop {
        let (found, lines) = logged();
        if found {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no line with {parts:?} in {}'s output: {lines:?}",
            agent.node.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The client pod, the server pod and their nodes.
pub fn ends(lab: &Lab) -> (&LabPod, &LabPod, &LabNode, &LabNode) {
    let client = lab.pod("cluster-1", "bench", "client").expect("client pod");
    let server = lab.pod("cluster-2", "bench", "server").expect("server pod");
    (client, server, lab.node_of(client), lab.node_of(server))
}

/// The server's address at `port`.
pub fn server_addr(lab: &Lab, port: u16) -> SocketAddr {
    SocketAddr::new(ends(lab).1.ip.into(), port)
}

/// Runs `nft ARGS…` inside `node`'s namespace; its stdout, or its stderr as the error.
pub fn nft(node: &LabNode, args: &[&str]) -> Result<String, String> {
    let out = node
        .netns
        .run(|| std::process::Command::new("nft").args(args).output())
        .expect("entering the node's namespace")
        .map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The `/config_dump` of the agent in `node`'s namespace (its admin endpoint, 15000).
pub async fn config_dump(node: &LabNode) -> serde_json::Value {
    let admin = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 15000);
    let answer = http_get(&node.netns, admin, "/config_dump", ANSWER)
        .await
        .expect("/config_dump answers");
    assert_eq!(answer.status, 200, "/config_dump");
    serde_json::from_slice(&answer.body).expect("/config_dump is JSON")
}

/// The `/metrics` of the agent in `node`'s namespace (its metrics endpoint, 15020), as text.
pub async fn metrics(node: &LabNode) -> String {
    let endpoint = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 15020);
    let answer = http_get(&node.netns, endpoint, "/metrics", ANSWER)
        .await
        .expect("/metrics answers");
    assert_eq!(answer.status, 200, "/metrics");
    String::from_utf8_lossy(&answer.body).into_owned()
}

/// A responder on `addr` in `netns` that answers each line as the address its connection
/// came from (the lab's responder protocol: the line, " answered by ", who).
pub fn serve_as_peer(netns: &weft::lab::Netns, addr: SocketAddr) {
    let listener = netns.listen(addr).expect("the listener");
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let answer = format!("{line} answered by {}\n", peer.ip());
                    if write.write_all(answer.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Dials `line` and `echo` from `from`: the line port is answered as `seen` (the address the
/// server saw), the echo port refused; then waits for both decisions in the agent's log since
/// the mark, each a line with `parts`, the endpoint dialled (`endpoint` at [`LINE_PORT`] and
/// [`ECHO_PORT`]) and its verdict.
pub async fn line_answered_echo_refused(
    from: &Netns,
    (line, echo): (SocketAddr, SocketAddr),
    endpoint: IpAddr,
    seen: IpAddr,
    (agent, log): (&RunningNode<'_>, usize),
    parts: &[&str],
    what: &str,
) {
    let answered = exchange(from, None, line, "hello", PROBE_TIMEOUT)
        .await
        .outcome;
    assert_eq!(
        answered,
        ExchangeOutcome::Answered {
            by: seen.to_string()
        },
        "{what}, the line port: the server sees {seen}"
    );
    let refused = exchange(from, None, echo, "hello", PROBE_TIMEOUT)
        .await
        .outcome;
    assert!(!refused.allowed(), "{what}, the echo port: {refused}");
    for (port, verdict) in [(LINE_PORT, "allow"), (ECHO_PORT, "deny")] {
        let destination = format!(r#""destination":"{}""#, SocketAddr::new(endpoint, port));
        let verdict = format!(r#""verdict":"{verdict}""#);
        let mut all = parts.to_vec();
        all.extend([destination.as_str(), verdict.as_str()]);
        wait_logged(agent, log, &all).await;
    }
}

/// Polls `check` every 100 ms until it holds or `within` passes; how long it took.
pub async fn eventually(
    within: Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> Option<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
