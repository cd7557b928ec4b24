//! The packet layer with the real `weft tracker`, `weft ca` and `weft node` (as root, in
//! network namespaces): UDP between a cluster-1 pod behind node A and a cluster-2 server behind
//! node B, through steps of policy written as the tracker reads them. No policy: delivered. A
//! UDP rule selecting the client across clusters, on a named port: delivered both ways, while
//! a TCP rule on another port admits no UDP (THREATS 34) and an unselected pod is dropped. A
//! tightening stops the flow already established. A broken policy changes nothing (the last
//! good state stays), an IPv6 ipBlock admits no IPv4 peer. An egress policy drops at the
//! source's node. Drops move the node's `weft_node_packets_dropped_total`.

mod dataplane_lab;
mod netns;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weft::demo::scenario::Step;
use weft::lab::{LabNode, LabPod, http_get};

/// How long a datagram may take; beyond it, it was dropped.
const WAIT: Duration = Duration::from_millis(500);
/// How long a node may take to apply a step once the tracker has it.
const APPLIED: Duration = Duration::from_secs(10);

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
    - ip: 10.1.1.11
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
        - {name: dns, containerPort: 5300, protocol: UDP}
        - {containerPort: 5301, protocol: UDP}
status:
  phase: Running
  podIPs:
    - ip: 10.2.1.10
";

/// The server admits UDP on its `dns` port from cluster-1's client only (a namespace selector
/// naming the cluster: selectors are global), and port 5301 on TCP only.
const SERVER_UDP: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: server
  namespace: bench
spec:
  podSelector:
    matchLabels:
      app: server
  ingress:
    - from:
        - namespaceSelector:
            matchLabels:
              cluster.clusterset.k8s.io: cluster-1
          podSelector:
            matchLabels:
              app: client
      ports:
        - {port: dns, protocol: UDP}
    - ports:
        - {port: 5301}
";

/// Tightened: the `dns` port from cluster-1's pod addresses but the client's.
const SERVER_TIGHT: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: server
  namespace: bench
spec:
  podSelector:
    matchLabels:
      app: server
  ingress:
    - from:
        - ipBlock:
            cidr: 10.1.1.0/24
            except: [10.1.1.10/32]
      ports:
        - {port: 5300, protocol: UDP}
";

/// Port 5301 over UDP from IPv6 addresses only: no IPv4 peer is among them.
const SERVER_V6_ONLY: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: v6-only
  namespace: bench
spec:
  podSelector:
    matchLabels:
      app: server
  ingress:
    - from:
        - ipBlock:
            cidr: ::/0
      ports:
        - {port: 5301, protocol: UDP}
";

/// Odd input the loader refuses (an exception outside the CIDR, endPort below port): the
/// cluster keeps its last good state, which must not widen.
const SERVER_BROKEN: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: server
  namespace: bench
spec:
  podSelector: {}
  ingress:
    - from:
        - ipBlock:
            cidr: 10.1.1.0/24
            except: [10.9.0.0/16]
      ports:
        - {port: 5300, endPort: 5000, protocol: UDP}
";

/// `other` may send UDP to port 53 only.
const OTHER_EGRESS: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: other-egress
  namespace: bench
spec:
  podSelector:
    matchLabels:
      app: other
  policyTypes: [Egress]
  egress:
    - ports:
        - {port: 53, protocol: UDP}
";

/// A step named `name`: the topology with `policies` (path below the clusterset, text).
fn step(name: &str, policies: &[(&str, &str)]) -> Step {
    let mut files: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    files.insert("cluster-1/bench.yaml".into(), CLUSTER_1.into());
    files.insert("cluster-2/bench.yaml".into(), CLUSTER_2.into());
    for (path, text) in policies {
        files.insert((*path).into(), (*text).into());
    }
    Step {
        name: name.into(),
        files,
        origin: None,
    }
}

/// A UDP socket of `pod` on `port`.
fn udp(pod: &LabPod, port: u16) -> UdpSocket {
    let addr = SocketAddr::new(pod.ip.into(), port);
    let socket = pod
        .netns
        .run(|| UdpSocket::bind(addr))
        .expect("entering the pod")
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    socket.set_read_timeout(Some(WAIT)).expect("timeout");
    socket
}

/// Whether a datagram from `a` reaches `b`, and whether `b`'s answer comes back.
fn exchange(a: &UdpSocket, b: &UdpSocket, what: &str) -> (bool, bool) {
    let dst = b.local_addr().expect("bound");
    a.send_to(what.as_bytes(), dst).expect("send");
    let mut buf = [0u8; 64];
    let Ok((n, src)) = b.recv_from(&mut buf) else {
        return (false, false);
    };
    assert_eq!(&buf[..n], what.as_bytes());
    b.send_to(b"answer", src).expect("answer");
    (true, a.recv_from(&mut buf).is_ok())
}

/// `node`'s agent's `weft_node_packets_dropped_total`, per direction.
async fn dropped(node: &LabNode) -> (u64, u64) {
    let metrics = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
    let answer = http_get(&node.netns, metrics, "/metrics", WAIT * 4)
        .await
        .expect("/metrics answers");
    let text = String::from_utf8_lossy(&answer.body);
    let value = |direction: &str| {
        let name = format!("weft_node_packets_dropped_total{{direction=\"{direction}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&name)?.parse().ok())
            .unwrap_or_else(|| panic!("no {name}in /metrics:\n{text}"))
    };
    (value("ingress"), value("egress"))
}

/// The packet layer `node`'s agent has installed, from its `/config_dump`.
async fn packets(node: &LabNode) -> serde_json::Value {
    let admin = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
    let answer = http_get(&node.netns, admin, "/config_dump", WAIT * 4)
        .await
        .expect("/config_dump answers");
    let dump: serde_json::Value = serde_json::from_slice(&answer.body).expect("JSON");
    dump["packets"].clone()
}

/// Waits until `node`'s installed packet layer satisfies `check`.
async fn applied(node: &LabNode, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let start = Instant::now();
    loop {
        let packets = packets(node).await;
        if check(&packets) {
            return;
        }
        assert!(
            start.elapsed() < APPLIED,
            "{}: {what} not applied: {packets:#}",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `node`'s drop counters reach `at_least` (they are read at each table check,
/// every second); what they then say.
async fn dropped_at_least(node: &LabNode, at_least: (u64, u64)) -> (u64, u64) {
    let start = Instant::now();
    loop {
        let now = dropped(node).await;
        if now.0 >= at_least.0 && now.1 >= at_least.1 {
            return now;
        }
        assert!(
            start.elapsed() < APPLIED,
            "{}: drops stayed at {now:?}, short of {at_least:?}",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn strings(value: &serde_json::Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_across_clusters_obeys_network_policy_at_both_nodes() {
    if !netns::prerequisites() {
        return;
    }
    let weft = Path::new(env!("CARGO_BIN_EXE_weft"));
    let work = tempfile::tempdir().expect("a temporary directory");
    let open = step("open", &[]);
    let (lab, set, open) = dataplane_lab::build_lab_of(work.path(), open);
    let client = lab.pod("cluster-1", "bench", "client").expect("client");
    let other = lab.pod("cluster-1", "bench", "other").expect("other");
    let server = lab.pod("cluster-2", "bench", "server").expect("server");
    let (node_a, node_b) = (lab.node_of(client), lab.node_of(server));
    let plane = dataplane_lab::start_plane(&lab, weft, work.path(), &set, &open).await;

    let dns = udp(server, 5300);
    let tcp_only = udp(server, 5301);
    let from_client = udp(client, 4000);
    let from_other = udp(other, 4000);

    // 1. No policy: delivered, and the answer comes back.
    assert_eq!(exchange(&from_client, &dns, "open"), (true, true));
    assert_eq!(exchange(&from_other, &tcp_only, "open"), (true, true));

    // 2. UDP on `dns` from cluster-1's client; 5301 on TCP only.
    let server_udp = step("server-udp", &[("cluster-2/policy.yaml", SERVER_UDP)]);
    let revision = plane.revision().await.expect("revision");
    let revision = plane
        .next_step(&open, &server_udp, true, revision)
        .await
        .expect("the tracker takes the step");
    let staging = work.path().join("staging-server-udp");
    let set = dataplane_lab::clusterset(&server_udp, &staging);
    plane
        .wait_nodes(&set, revision)
        .await
        .expect("nodes at the step");
    applied(node_b, "the server's UDP rule", |p| {
        strings(&p["ingress_allowed"]) == ["10.2.1.10 . udp . 5300 . 10.1.1.10"]
    })
    .await;
    let before = dropped(node_b).await;
    assert_eq!(exchange(&from_client, &dns, "allowed"), (true, true));
    assert_eq!(exchange(&from_other, &dns, "not selected"), (false, false));
    assert_eq!(
        exchange(&from_client, &tcp_only, "a TCP rule admits no UDP"),
        (false, false)
    );
    dropped_at_least(node_b, (before.0 + 2, before.1)).await;

    // 3. Tightened: the client's flow, already established, stops; `other` is admitted now.
    //    An IPv6-only ipBlock beside it admits no IPv4 peer.
    let tight = step(
        "server-tight",
        &[
            ("cluster-2/policy.yaml", SERVER_TIGHT),
            ("cluster-2/v6-only.yaml", SERVER_V6_ONLY),
        ],
    );
    let revision = plane
        .next_step(&server_udp, &tight, true, revision)
        .await
        .expect("the tracker takes the step");
    applied(node_b, "the tightened rule", |p| {
        strings(&p["ingress_allowed"]).contains(&"10.2.1.10 . udp . 5300 . 10.1.1.11-10.1.1.255")
    })
    .await;
    assert_eq!(exchange(&from_client, &dns, "established"), (false, false));
    assert_eq!(exchange(&from_other, &dns, "now admitted"), (true, true));
    assert_eq!(
        exchange(&from_other, &tcp_only, "v4 to v6-only"),
        (false, false)
    );

    // 4. A broken policy: the tracker keeps cluster-2's last good state; nothing widens.
    let broken = step(
        "server-broken",
        &[
            ("cluster-2/policy.yaml", SERVER_BROKEN),
            ("cluster-2/v6-only.yaml", SERVER_V6_ONLY),
        ],
    );
    let good = packets(node_b).await;
    plane
        .next_step(&tight, &broken, false, revision)
        .await
        .expect("the step is written");
    // The tracker reports the error in cluster-2's status (a new revision), nothing else.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let revision = plane.revision().await.expect("revision");
    let kept = packets(node_b).await;
    assert_eq!(kept["ingress_allowed"], good["ingress_allowed"]);
    assert_eq!(kept["ingress_isolated"], good["ingress_isolated"]);
    assert_eq!(
        exchange(&from_client, &dns, "after bad input"),
        (false, false)
    );
    assert_eq!(
        exchange(&from_client, &tcp_only, "after bad input"),
        (false, false)
    );
    assert_eq!(exchange(&from_other, &dns, "after bad input"), (true, true));

    // 5. `other` may send to port 53 only: dropped at its own node, never reaching node B.
    let egress = step(
        "other-egress",
        &[
            ("cluster-2/policy.yaml", SERVER_TIGHT),
            ("cluster-2/v6-only.yaml", SERVER_V6_ONLY),
            ("cluster-1/policy.yaml", OTHER_EGRESS),
        ],
    );
    plane
        .next_step(&broken, &egress, true, revision)
        .await
        .expect("the tracker takes the step");
    applied(node_a, "the egress rule", |p| {
        strings(&p["egress_isolated"]) == ["10.1.1.11"]
    })
    .await;
    let (a_before, b_before) = (dropped(node_a).await, dropped(node_b).await);
    assert_eq!(exchange(&from_other, &dns, "egress denied"), (false, false));
    dropped_at_least(node_a, (a_before.0, a_before.1 + 1)).await;
    assert_eq!(dropped(node_b).await, b_before, "node B never saw it");
    // The client is not selected by the egress policy: still judged only at node B.
    assert_eq!(exchange(&from_client, &dns, "client"), (false, false));
}
