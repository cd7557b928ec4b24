//! The network-namespace lab (`weft::lab`) on its own, with no weft process capturing: the
//! two-cluster example's pods reach each other across nodes and clusters with plain TCP, the
//! wire reaches pods, and nothing is left behind once the lab is dropped or its run is dead.

mod netns;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use weft::lab::{ExchangeOutcome, Lab, LabOptions, exchange};
use weft::model::loader;

const TIMEOUT: Duration = Duration::from_secs(3);

fn example() -> weft::model::ClusterSet {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/two-cluster/1-no-policy");
    loader::load_clusterset(&dir)
        .expect("the example loads")
        .clusterset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_reach_pods_across_nodes_and_clusters_and_nothing_is_left_behind() {
    if !netns::prerequisites() {
        return;
    }
    let lab = Lab::build(&example(), &LabOptions::default()).expect("the lab builds");
    let prefix = lab.prefix().to_owned();
    assert_eq!(
        Lab::namespaces_of(&prefix).len(),
        1 + 2 + 4,
        "the wire, two nodes, four pods"
    );
    for pod in lab.pods() {
        for port in &pod.tcp_ports {
            lab.serve_responder(
                &pod.netns,
                SocketAddr::new(IpAddr::V4(pod.ip), *port),
                &pod.key(),
            )
            .expect("a responder");
        }
    }
    let client = lab
        .pod("cluster-1", "demo-c1", "tmp-client")
        .expect("tmp-client");
    let web_c2 = lab.pod("cluster-2", "demo-c2", "web-c2").expect("web-c2");
    let web_c1 = lab.pod("cluster-1", "demo-c1", "web-c1").expect("web-c1");
    let to_c2 = SocketAddr::new(IpAddr::V4(web_c2.ip), 80);

    // Across clusters (and nodes), from the pod's own address.
    let got = exchange(&client.netns, None, to_c2, "hello", TIMEOUT).await;
    assert_eq!(
        got.outcome,
        ExchangeOutcome::Answered {
            by: "cluster-2/demo-c2/web-c2".into()
        }
    );
    assert_eq!(got.local.map(|a| a.ip()), Some(IpAddr::V4(client.ip)));
    // The other way, and on the same node.
    let to_c1 = SocketAddr::new(IpAddr::V4(web_c1.ip), 80);
    let back = exchange(&web_c2.netns, None, to_c1, "back", TIMEOUT).await;
    assert!(back.outcome.allowed(), "{}", back.outcome);
    let local = exchange(&client.netns, None, to_c1, "local", TIMEOUT).await;
    assert!(local.outcome.allowed(), "{}", local.outcome);
    // From the wire, from an address outside every cluster.
    lab.wire()
        .ip(&["addr", "add", "203.0.113.7/32", "dev", "lo"])
        .expect("an outside address");
    let outside = exchange(
        lab.wire(),
        Some("203.0.113.7".parse().expect("ip")),
        to_c2,
        "outside",
        TIMEOUT,
    )
    .await;
    assert!(outside.outcome.allowed(), "{}", outside.outcome);
    // Nothing listens on this port: refused, not timed out.
    let closed = exchange(
        &client.netns,
        None,
        SocketAddr::new(IpAddr::V4(web_c2.ip), 81),
        "nobody",
        TIMEOUT,
    )
    .await;
    assert_eq!(closed.outcome, ExchangeOutcome::Refused);
    // Nodes reach the wire's address, where the control plane listens.
    let node = lab.node_of(client);
    let wire = SocketAddr::new(IpAddr::V4(lab.wire_ip()), 19090);
    lab.serve_responder(lab.wire(), wire, "wire")
        .expect("a responder");
    let control = exchange(&node.netns, None, wire, "control", TIMEOUT).await;
    assert!(control.outcome.allowed(), "{}", control.outcome);

    // A process in a namespace is killed with the lab.
    let sleeper = lab
        .spawn(
            &web_c2.netns,
            "sleep",
            std::process::Command::new("sleep").arg("600"),
        )
        .expect("sleep starts");
    assert!(lab.exit_status(&sleeper).is_none());
    let pid = sleeper.pid().expect("a pid");
    // `ip netns exec` enters the namespace, then becomes `sleep`.
    let mut waited = Duration::ZERO;
    while web_c2.netns.pids() != [pid] && waited < TIMEOUT {
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += Duration::from_millis(10);
    }
    assert_eq!(web_c2.netns.pids(), [pid]);

    drop(lab);
    assert!(
        Lab::namespaces_of(&prefix).is_empty(),
        "left behind: {:?}",
        Lab::namespaces_of(&prefix)
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "the process is gone"
    );
}

#[test]
fn sweep_deletes_what_dead_runs_left_and_only_that() {
    if !netns::prerequisites() {
        return;
    }
    // No process has this id: pids stop below 2^22.
    let dead = "weft-999999999-0-w";
    let live = format!("weft-{}-99-w", std::process::id());
    for name in [dead, live.as_str()] {
        let status = std::process::Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .expect("ip runs");
        assert!(status.success(), "ip netns add {name}");
    }
    let swept = weft::lab::sweep().expect("sweeps");
    let left = Lab::namespaces_of(&format!("weft-{}-99", std::process::id()));
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &live])
        .status();
    assert!(swept.contains(&dead.to_owned()), "{swept:?}");
    assert!(!swept.contains(&live), "{swept:?}");
    assert_eq!(left, [live]);
    assert!(Lab::namespaces_of("weft-999999999").is_empty());
}
