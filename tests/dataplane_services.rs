//! A ClusterIP Service through the real data plane, on the lab of `tests/dataplane_lab/`, as
//! root: cluster-1's Service `server` (10.96.0.10) has an EndpointSlice naming cluster-2's
//! server pod (a multi-cluster Service), port 80 to the server's line port, which its policy
//! admits, and port 81 to its echo port, which it does not. Node A resolves the ClusterIP and
//! policy judges the endpoint at its target port; then the same with kube-proxy's DNAT of the
//! ClusterIP in node A's namespace (an nftables nat chain at `dstnat`, -100, before capture's
//! `prerouting` at -90): the connection is captured and judged on the endpoint, and the
//! server sees it come from the client's own address (node B dials from the tunnel's source).
//! Then a
//! hostPort of the client pod (a portmap DNAT of node A's address): a connection from outside
//! is captured too and judged by the client's ingress policy, which admits nothing. Last, a
//! NodePort of the Service from outside, DNATed by kube-proxy in node A to cluster-2's server
//! and masqueraded (the endpoint is on another node): node B sees node A's address, plaintext,
//! and judges it by the server's ingress policy at the endpoint's port. A second test dials an
//! address outside every cluster: dialled directly from the client's own address when its
//! egress policy admits the port, denied at the source otherwise. A third kills both agents:
//! nothing of their pods' TCP passes, whatever its destination.

mod dataplane_lab;
mod netns;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use weft::lab::{ExchangeOutcome, Netns, exchange};

use dataplane_lab::{ECHO_PORT, LINE_PORT, line_answered_echo_refused, nft, serve_as_peer};

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The ClusterIP of cluster-1's Service `server`.
const CLUSTER_IP: &str = "10.96.0.10";

/// Service `server` of cluster-1 and its slice, naming cluster-2's server pod.
const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: server
  namespace: bench
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
    - {name: line, port: 80, targetPort: 5203, protocol: TCP}
    - {name: echo, port: 81, targetPort: 5202, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: server-remote
  namespace: bench
  labels:
    kubernetes.io/service-name: server
addressType: IPv4
endpoints:
  - addresses: [10.2.1.10]
    conditions: {ready: true}
ports:
  - {name: line, port: 5203, protocol: TCP}
  - {name: echo, port: 5202, protocol: TCP}
";

/// The client's hostPort 30080 on node A (192.168.1.11), as the portmap CNI plugin DNATs it.
const HOST_PORT: &str = "\
table ip host_port_test {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr 192.168.1.11 tcp dport 30080 dnat to 10.1.1.10:5203
  }
}
";

/// kube-proxy's NodePorts 30081 and 30082 of the Service on node A, to the endpoint on another
/// node: DNAT, and the mark by which kube-proxy masquerades such packets as they leave.
const NODE_PORT: &str = "\
table ip node_port_test {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr 192.168.1.11 tcp dport 30081 meta mark set meta mark | 0x4000 dnat to 10.2.1.10:5203
    ip daddr 192.168.1.11 tcp dport 30082 meta mark set meta mark | 0x4000 dnat to 10.2.1.10:5202
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    meta mark & 0x4000 == 0x4000 masquerade
  }
}
";

/// kube-proxy's part for the Service in a node: DNAT of the ClusterIP's ports to the endpoint.
const KUBE_PROXY: &str = "\
table ip kube_proxy_test {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr 10.96.0.10 tcp dport 80 dnat to 10.2.1.10:5203
    ip daddr 10.96.0.10 tcp dport 81 dnat to 10.2.1.10:5202
  }
}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_ip_a_host_port_and_a_node_port_are_judged_on_their_endpoint_through_dnat() {
    if !netns::prerequisites() {
        return;
    }
    let weft = Path::new(env!("CARGO_BIN_EXE_weft"));
    let work = tempfile::tempdir().expect("a temporary directory");
    let mut step = dataplane_lab::line_port_only();
    step.name = "service".into();
    step.files
        .insert("cluster-1/service.yaml".into(), SERVICE.into());
    // The client admits no ingress.
    let isolated = dataplane_lab::network_policy(
        "client-isolated",
        "{matchLabels: {app: client}}",
        "policyTypes: [Ingress]",
    );
    step.files
        .insert("cluster-1/client-isolated.yaml".into(), isolated.into());
    let (lab, set, step) = dataplane_lab::build_lab_of(work.path(), step);
    let (client, server, node_a, node_b) = dataplane_lab::ends(&lab);
    // The line port answers as the address the connection came from: the client's, through
    // both nodes (node B dials the server from the tunnel's source).
    serve_as_peer(&server.netns, dataplane_lab::server_addr(&lab, LINE_PORT));
    lab.serve_responder(
        &server.netns,
        dataplane_lab::server_addr(&lab, ECHO_PORT),
        "server",
    )
    .expect("the server's responder");
    let plane = dataplane_lab::start_plane(&lab, weft, work.path(), &set, &step).await;
    let agent = dataplane_lab::agent(&plane, node_a);
    let service = |port: u16| SocketAddr::new(CLUSTER_IP.parse().expect("ip"), port);

    for dnat in [false, true] {
        if dnat {
            let rules = work.path().join("kube-proxy.nft");
            std::fs::write(&rules, KUBE_PROXY).expect("kube-proxy's rules written");
            nft(node_a, &["-f", &rules.to_string_lossy()]).expect("kube-proxy's DNAT installed");
        }
        let log = agent.process.output().mark();
        // Through node A's outbound proxy, judged and dialled at the endpoint's port.
        line_answered_echo_refused(
            &client.netns,
            (service(80), service(81)),
            server.ip.into(),
            client.ip.into(),
            (agent, log),
            &[r#""direction":"outbound""#],
            &format!("the ClusterIP with DNAT {dnat}"),
        )
        .await;
        // Node A's word for it: the destination's node refused the tunnel.
        let refused = format!(
            r#""destination":"{}""#,
            SocketAddr::new(server.ip.into(), ECHO_PORT)
        );
        let by_destination = r#""verdict":"deny","layer":"destination","denial":"refused""#;
        dataplane_lab::wait_logged(agent, log, &[&refused, by_destination]).await;
    }

    // A hostPort: from outside (the wire between the nodes) to node A's address, DNATed to the
    // client, which admits no ingress.
    lab.serve_responder(
        &client.netns,
        SocketAddr::new(client.ip.into(), LINE_PORT),
        "client",
    )
    .expect("the client's responder");
    let rules = work.path().join("host-port.nft");
    std::fs::write(&rules, HOST_PORT).expect("the hostPort rule written");
    nft(node_a, &["-f", &rules.to_string_lossy()]).expect("the hostPort DNAT installed");
    let log = agent.process.output().mark();
    let host_port = SocketAddr::new(node_a.ip.into(), 30080);
    let outside = exchange(lab.wire(), None, host_port, "hello", PROBE_TIMEOUT)
        .await
        .outcome;
    assert!(!outside.allowed(), "the hostPort from outside: {outside}");
    let destination = format!(r#""destination":"{}:{LINE_PORT}""#, client.ip);
    let parts = [
        r#""direction":"plaintext""#,
        &destination,
        r#""verdict":"deny""#,
    ];
    dataplane_lab::wait_logged(agent, log, &parts).await;

    // A NodePort from outside, to an endpoint behind node B.
    let rules = work.path().join("node-port.nft");
    std::fs::write(&rules, NODE_PORT).expect("the NodePort rules written");
    nft(node_a, &["-f", &rules.to_string_lossy()]).expect("the NodePort DNAT installed");
    let agent_b = dataplane_lab::agent(&plane, node_b);
    let log = agent_b.process.output().mark();
    let node_port = |port: u16| SocketAddr::new(node_a.ip.into(), port);
    let source = format!(r#""source":"{}:"#, node_a.ip);
    line_answered_echo_refused(
        lab.wire(),
        (node_port(30081), node_port(30082)),
        server.ip.into(),
        node_a.ip.into(),
        (agent_b, log),
        &[r#""direction":"plaintext""#, &source],
        "the NodePort, masqueraded by node A",
    )
    .await;

    drop(plane);
    dataplane_lab::drop_lab(lab);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_outside_every_cluster_is_dialled_from_the_pod_after_its_egress_check() {
    if !netns::prerequisites() {
        return;
    }
    let weft = Path::new(env!("CARGO_BIN_EXE_weft"));
    let work = tempfile::tempdir().expect("a temporary directory");
    let mut step = dataplane_lab::line_port_only();
    step.name = "outside".into();
    // The client may reach the nodes' segment on one port only.
    let egress = dataplane_lab::network_policy(
        "client-egress",
        "{matchLabels: {app: client}}",
        "policyTypes: [Egress]\negress:\n  - to: [{ipBlock: {cidr: 192.168.1.0/24}}]\n    \
         ports: [{port: 7001, protocol: TCP}]",
    );
    step.files
        .insert("cluster-1/client-egress.yaml".into(), egress.into());
    let (lab, set, step) = dataplane_lab::build_lab_of(work.path(), step);
    let (client, _, node_a, _) = dataplane_lab::ends(&lab);
    // The wire's address is no pod's and no node's: outside every cluster, routed back to
    // pods through their nodes.
    let outside = |port: u16| SocketAddr::new(lab.wire_ip().into(), port);
    serve_as_peer(lab.wire(), outside(7001));
    serve_as_peer(lab.wire(), outside(7002));
    let plane = dataplane_lab::start_plane(&lab, weft, work.path(), &set, &step).await;
    let agent = dataplane_lab::agent(&plane, node_a);
    let log = agent.process.output().mark();

    let allowed = exchange(&client.netns, None, outside(7001), "hello", PROBE_TIMEOUT)
        .await
        .outcome;
    assert_eq!(
        allowed,
        ExchangeOutcome::Answered {
            by: client.ip.to_string()
        },
        "the admitted port: the destination sees the client, not node A"
    );
    let denied = exchange(&client.netns, None, outside(7002), "hello", PROBE_TIMEOUT)
        .await
        .outcome;
    assert!(!denied.allowed(), "another port: {denied}");
    for (port, verdict, reason) in [(7001, "allow", "direct"), (7002, "deny", "egress")] {
        let destination = format!(r#""destination":"{}""#, outside(port));
        let verdict = format!(r#""verdict":"{verdict}""#);
        let parts = [r#""direction":"outbound""#, &destination, &verdict, reason];
        dataplane_lab::wait_logged(agent, log, &parts).await;
    }

    drop(plane);
    dataplane_lab::drop_lab(lab);
}

/// With its agent gone, a node passes none of its pods' TCP, whatever the destination:
/// capture's rules stay, and a connection no listener takes is dropped, never forwarded
/// uncaptured. Before, the egress to an address outside the mesh that policy admits is
/// answered, and plaintext from outside to the server is refused by its ingress policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_agent_a_node_passes_none_of_its_pods_tcp() {
    if !netns::prerequisites() {
        return;
    }
    let weft = Path::new(env!("CARGO_BIN_EXE_weft"));
    let work = tempfile::tempdir().expect("a temporary directory");
    let mut step = dataplane_lab::step_with("agentless", &[]);
    let egress = dataplane_lab::network_policy(
        "client-egress",
        "{matchLabels: {app: client}}",
        "policyTypes: [Egress]\negress:\n  - to: [{ipBlock: {cidr: 192.168.1.0/24}}]\n    \
         ports: [{port: 7001, protocol: TCP}]\n  - to: [{podSelector: {}, \
         namespaceSelector: {}}]",
    );
    // The server admits pods only: plaintext from outside is denied.
    let ingress = dataplane_lab::network_policy(
        "line-port-only",
        dataplane_lab::SELECT_SERVER,
        "policyTypes: [Ingress]\ningress:\n  - from: [{podSelector: {}, namespaceSelector: {}}]",
    );
    step.files
        .insert("cluster-1/client-egress.yaml".into(), egress.into());
    step.files
        .insert("cluster-2/policy.yaml".into(), ingress.into());
    let (lab, set, step) = dataplane_lab::build_lab_of(work.path(), step);
    let (client, server, node_a, node_b) = dataplane_lab::ends(&lab);
    let outside = SocketAddr::new(lab.wire_ip().into(), 7001);
    serve_as_peer(lab.wire(), outside);
    let to_server = dataplane_lab::server_addr(&lab, LINE_PORT);
    lab.serve_responder(&server.netns, to_server, "server")
        .expect("the server's responder");
    let plane = dataplane_lab::start_plane(&lab, weft, work.path(), &set, &step).await;
    let reached = async |from: &Netns, to: SocketAddr| {
        exchange(from, None, to, "hello", PROBE_TIMEOUT)
            .await
            .outcome
            .allowed()
    };
    assert!(reached(&client.netns, outside).await, "egress admitted");
    assert!(reached(&client.netns, to_server).await, "client → server");
    assert!(
        !reached(lab.wire(), to_server).await,
        "ingress from outside"
    );

    let uncaptured = async || {
        dataplane_lab::config_dump(node_a).await["capture"]["uncaptured_dropped"]
            .as_u64()
            .expect("uncaptured_dropped")
    };
    // Read at each table check: a second's wait makes it current.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = uncaptured().await;
    for node in [node_a, node_b] {
        lab.kill(&dataplane_lab::agent(&plane, node).process).await;
    }
    assert!(
        !reached(&client.netns, outside).await,
        "egress without node A's agent"
    );
    assert!(
        !reached(&client.netns, to_server).await,
        "client → server without agents"
    );
    assert!(
        !reached(lab.wire(), to_server).await,
        "ingress without node B's agent"
    );

    // The next agent counts what its table dropped while no agent ran, with what it had
    // counted before: the counts survive the table it replaces.
    let mut plane = plane;
    let revision = plane.revision().await.expect("the tracker's revision");
    for index in 0..plane.nodes.len() {
        plane.start_node(index).expect("the agent starts again");
    }
    plane
        .wait_nodes(&set, revision)
        .await
        .expect("the agents are ready again");
    let counted = dataplane_lab::eventually(Duration::from_secs(5), async || {
        // The SYNs of two connections, each sent at least twice within the probe's time.
        uncaptured().await >= before + 4
    })
    .await;
    assert!(
        counted.is_some(),
        "before the outage {before}, after {:?}",
        uncaptured().await
    );
    assert!(
        reached(&client.netns, to_server).await,
        "client → server again"
    );

    drop(plane);
    dataplane_lab::drop_lab(lab);
}
