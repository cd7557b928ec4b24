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

use std::fmt::Debug;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use weft::demo::plane::ControlPlane;
use weft::demo::scenario::Step;
use weft::lab::{LabNode, LabPod};

use dataplane_lab::{
    DNS_PORT, FROM_CLUSTER_1_CLIENT, SELECT_SERVER, UDP_PORT, network_policy, step_with,
};

/// How long a datagram may take; beyond it, it was dropped.
const WAIT: Duration = Duration::from_millis(500);
/// How long a node may take to apply a step once the tracker has it.
const APPLIED: Duration = Duration::from_secs(10);

/// The server admits UDP on its `dns` port from cluster-1's client only, and port 5301 on TCP
/// only.
/// The server admits UDP on its `dns` port from cluster-1's client only, and port 5301 on TCP
/// only.
fn server_udp() -> String {
    network_policy(
        "server",
        SELECT_SERVER,
        &format!(
            "\
ingress:
  - from: [{FROM_CLUSTER_1_CLIENT}]
    ports: [{{port: dns, protocol: UDP}}]
  - ports: [{{port: 5301}}]
"
        ),
    )
}

/// Tightened: the `dns` port from cluster-1's pod addresses but the client's.
fn server_tight() -> String {
    network_policy(
        "server",
        SELECT_SERVER,
        "\
ingress:
  - from: [{ipBlock: {cidr: 10.1.1.0/24, except: [10.1.1.10/32]}}]
    ports: [{port: 5300, protocol: UDP}]
",
    )
}

/// Port 5301 over UDP from IPv6 addresses only: no IPv4 peer is among them.
fn server_v6_only() -> String {
    network_policy(
        "v6-only",
        SELECT_SERVER,
        "\
ingress:
  - from: [{ipBlock: {cidr: '::/0'}}]
    ports: [{port: 5301, protocol: UDP}]
",
    )
}

/// Odd input the loader refuses (an exception outside the CIDR, endPort below port): the
/// cluster keeps its last good state, which must not widen.
fn server_broken() -> String {
    network_policy(
        "server",
        "{}",
        "\
ingress:
  - from: [{ipBlock: {cidr: 10.1.1.0/24, except: [10.9.0.0/16]}}]
    ports: [{port: 5300, endPort: 5000, protocol: UDP}]
",
    )
}

/// `other` may send UDP to port 53 only.
fn other_egress() -> String {
    network_policy(
        "other-egress",
        "{matchLabels: {app: other}}",
        "\
policyTypes: [Egress]
egress:
  - ports: [{port: 53, protocol: UDP}]
",
    )
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
    let text = dataplane_lab::metrics(node).await;
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
    dataplane_lab::config_dump(node).await["packets"].clone()
}

/// Reads `read()` until `done` holds of what it read, which it returns; `what` is awaited of
/// `node`, which has [`APPLIED`] to get there.
async fn until<T: Debug, F: Future<Output = T>>(
    node: &LabNode,
    what: &str,
    read: impl Fn() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let start = Instant::now();
    loop {
        let now = read().await;
        if done(&now) {
            return now;
        }
        assert!(
            start.elapsed() < APPLIED,
            "{}: {what}, still {now:#?}",
            node.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `node`'s installed packet layer satisfies `check`.
async fn applied(node: &LabNode, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let what = format!("{what} not applied");
    until(node, &what, || packets(node), check).await;
}

/// Waits until `node`'s drop counters reach `at_least` (they are read at each table check,
/// every second); what they then say.
async fn dropped_at_least(node: &LabNode, at_least: (u64, u64)) -> (u64, u64) {
    let what = format!("drops short of {at_least:?}");
    until(
        node,
        &what,
        || dropped(node),
        |now| now.0 >= at_least.0 && now.1 >= at_least.1,
    )
    .await
}

/// Has the tracker take step `to` after `from`, changed since `revision`; its new revision.
async fn take(plane: &ControlPlane<'_>, from: &Step, to: &Step, revision: u64) -> u64 {
    plane
        .next_step(from, to, true, revision)
        .await
        .expect("the tracker takes the step")
}

/// What becomes of each datagram: (from, to, what it says, (delivered, answered)).
fn expect(datagrams: &[(&UdpSocket, &UdpSocket, &str, (bool, bool))]) {
    for &(from, to, what, fate) in datagrams {
        assert_eq!(exchange(from, to, what), fate, "{what}");
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
    let open = step_with("open", &[]);
    let (lab, set, open) = dataplane_lab::build_lab_of(work.path(), open);
    let (client, server, node_a, node_b) = dataplane_lab::ends(&lab);
    let other = lab.pod("cluster-1", "bench", "other").expect("other");
    let plane = dataplane_lab::start_plane(&lab, weft, work.path(), &set, &open).await;

    let dns = udp(server, DNS_PORT);
    let tcp_only = udp(server, UDP_PORT);
    let from_client = udp(client, 4000);
    let from_other = udp(other, 4000);

    // 1. No policy: delivered, and the answer comes back.
    expect(&[
        (&from_client, &dns, "open", (true, true)),
        (&from_other, &tcp_only, "open", (true, true)),
    ]);

    // 2. UDP on `dns` from cluster-1's client; 5301 on TCP only.
    let server_udp = step_with("server-udp", &[("cluster-2/policy.yaml", &server_udp())]);
    let revision = plane.revision().await.expect("revision");
    let revision = take(&plane, &open, &server_udp, revision).await;
    let staging = work.path().join("staging-server-udp");
    let set = dataplane_lab::clusterset(&server_udp, &staging);
    plane
        .wait_nodes(&set, revision)
        .await
        .expect("nodes at the step");
    applied(node_b, "the server's UDP rule", |p| {
        // Both families: the pods are dual-stack.
        strings(&p["ingress_allowed"])
            == [
                "10.2.1.10 . udp . 5300 . 10.1.1.10",
                "fd00:10:2:1::10 . udp . 5300 . fd00:10:1:1::10",
            ]
    })
    .await;
    let before = dropped(node_b).await;
    expect(&[
        (&from_client, &dns, "allowed", (true, true)),
        (&from_other, &dns, "not selected", (false, false)),
        (
            &from_client,
            &tcp_only,
            "a TCP rule admits no UDP",
            (false, false),
        ),
    ]);
    dropped_at_least(node_b, (before.0 + 2, before.1)).await;

    // 3. Tightened: the client's flow, already established, stops; `other` is admitted now.
    //    An IPv6-only ipBlock beside it admits no IPv4 peer.
    let v6_only = server_v6_only();
    let tight = step_with(
        "server-tight",
        &[
            ("cluster-2/policy.yaml", &server_tight()),
            ("cluster-2/v6-only.yaml", &v6_only),
        ],
    );
    let revision = take(&plane, &server_udp, &tight, revision).await;
    applied(node_b, "the tightened rule", |p| {
        strings(&p["ingress_allowed"]).contains(&"10.2.1.10 . udp . 5300 . 10.1.1.11-10.1.1.255")
    })
    .await;
    expect(&[
        (&from_client, &dns, "established", (false, false)),
        (&from_other, &dns, "now admitted", (true, true)),
        (&from_other, &tcp_only, "v4 to v6-only", (false, false)),
    ]);

    // 4. A broken policy: the tracker keeps cluster-2's last good state; nothing widens.
    let broken = step_with(
        "server-broken",
        &[
            ("cluster-2/policy.yaml", &server_broken()),
            ("cluster-2/v6-only.yaml", &v6_only),
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
    expect(&[
        (&from_client, &dns, "after bad input", (false, false)),
        (&from_client, &tcp_only, "after bad input", (false, false)),
        (&from_other, &dns, "after bad input", (true, true)),
    ]);

    // 5. `other` may send to port 53 only: dropped at its own node, never reaching node B.
    let egress = step_with(
        "other-egress",
        &[
            ("cluster-2/policy.yaml", &server_tight()),
            ("cluster-2/v6-only.yaml", &v6_only),
            ("cluster-1/policy.yaml", &other_egress()),
        ],
    );
    take(&plane, &broken, &egress, revision).await;
    applied(node_a, "the egress rule", |p| {
        strings(&p["egress_isolated"]) == ["10.1.1.12", "fd00:10:1:1::12"]
    })
    .await;
    // Node B's counters lag its drops by up to a table check: wait for the two drops of
    // each of steps 2 to 4, lest one of them land after the baseline.
    let b_before = dropped_at_least(node_b, (before.0 + 6, before.1)).await;
    let a_before = dropped(node_a).await;
    expect(&[(&from_other, &dns, "egress denied", (false, false))]);
    dropped_at_least(node_a, (a_before.0, a_before.1 + 1)).await;
    assert_eq!(dropped(node_b).await, b_before, "node B never saw it");
    // The client is not selected by the egress policy: still judged only at node B.
    expect(&[(&from_client, &dns, "client", (false, false))]);
}
