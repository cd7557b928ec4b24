//! Hub and spoke over clusterset sources: a spoke takes every other cluster from its hub and
//! its own from its own source (which wins); while the hub is away the hub's clusters keep
//! their last state, disconnected and aging, then expire; a restarted hub's fresh snapshot
//! replaces them, deletes included. And two sources claiming one cluster: the first keeps it.

mod tracking;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tracking::{Served, has_pod, serve_on, status, subscriber, verdict, wait_for};
use weft::model::{ClusterId, Pod};
use weft::policy::Verdict::Deny;
use weft::tracker::replica::Replica;
use weft::tracker::server::Tracker;
use weft::tracker::source::{ClustersetSource, upstream};
use weft::tracker::view::{Change, View};
use weft::tracker::wire::{Object, pb};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/two-cluster");
const MAX_STALENESS: Duration = Duration::from_millis(400);

/// A tracker of the clusterset at `dir`, served on `addr` until stopped.
async fn hub(dir: &Path, addr: SocketAddr) -> (Tracker, String, Served) {
    let mut source = ClustersetSource::new(dir);
    let tracker = Tracker::new(View::new(uuid::Uuid::new_v4().to_string(), 1000), 1 << 20);
    tracker.apply_from(&source.name(), source.rescan().expect("clusterset loads"));
    let served = serve_on(&tracker, addr).await;
    (tracker, source.name(), served)
}

fn pod(cluster: &str, namespace: &str, name: &str, ip: &str) -> Object {
    Object::Pod(
        Pod::from_api(
            &ClusterId::new(cluster).expect("id"),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}")},
                "status": {"phase": "Running", "podIP": ip}}))
            .expect("pod"),
        )
        .expect("valid"),
    )
}

#[tokio::test]
async fn a_spoke_takes_other_clusters_from_its_hub_and_its_own_from_itself() {
    let (hub_tracker, hub_source, first_hub) = hub(
        &Path::new(EXAMPLE).join("3-allow-from-cluster-1"),
        ([127, 0, 0, 1], 0).into(),
    )
    .await;

    // The spoke of cluster-2 watches its own cluster: step 2's (deny all), not the hub's.
    let own_dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(
        Path::new(EXAMPLE).join("2-default-deny/cluster-2"),
        own_dir.path().join("cluster-2"),
    )
    .expect("symlink");
    let mut own = ClustersetSource::new(own_dir.path());
    let spoke = Tracker::new(View::new("spoke", 1000), 1 << 20);
    spoke.apply_from(&own.name(), own.rescan().expect("own cluster loads"));
    let hub_addr = first_hub.addr;
    tokio::spawn(upstream::follow(
        first_hub.target.clone(),
        ClusterId::new("cluster-2").expect("id"),
        spoke.clone(),
        MAX_STALENESS,
        Duration::from_millis(50),
    ));

    let replica = subscriber(tracking::serve(&spoke).await);
    let (from, to) = ("cluster-1/demo-c1/tmp-client", "cluster-2/demo-c2/web-c2");
    wait_for(&replica, "cluster-1 from the hub", |r| {
        r.ready() && has_pod(r, "cluster-1", "demo-c1", "tmp-client")
    })
    .await;
    assert_eq!(
        verdict(&replica.read().expect("lock"), from, to),
        Deny,
        "the spoke's own cluster-2 (deny all) wins over the hub's (allow from cluster-1)"
    );

    // A change in the hub reaches the spoke's subscribers; one to the spoke's own cluster
    // does not.
    hub_tracker.apply_from(
        &hub_source,
        Change {
            upserts: vec![
                pod("cluster-1", "demo-c1", "late", "10.1.9.9"),
                pod("cluster-2", "demo-c2", "hub-only", "10.2.9.9"),
            ],
            ..Change::default()
        },
    );
    wait_for(&replica, "the hub's new pod", |r| {
        has_pod(r, "cluster-1", "demo-c1", "late")
    })
    .await;
    assert!(!has_pod(
        &replica.read().expect("lock"),
        "cluster-2",
        "demo-c2",
        "hub-only"
    ));

    // The hub goes away: its clusters stay (fail static), disconnected, then expire.
    first_hub.stop().await;
    wait_for(&replica, "cluster-1 disconnected", |r| {
        status(r, "cluster-1").is_some_and(|s| !s.connected && s.error.contains("127.0.0.1"))
    })
    .await;
    assert!(has_pod(
        &replica.read().expect("lock"),
        "cluster-1",
        "demo-c1",
        "late"
    ));
    wait_for(&replica, "cluster-1 expired", |r| {
        status(r, "cluster-1").is_some_and(|s| s.expired && s.stale_for_ms > 400)
    })
    .await;
    let own_status = status(&replica.read().expect("lock"), "cluster-2")
        .cloned()
        .expect("own status");
    assert!(
        own_status.connected && !own_status.expired,
        "{own_status:?}"
    );

    // A restarted hub (a new epoch, step 1's clusters): a fresh snapshot replaces what the
    // spoke held of cluster-1, deleting what the new hub lacks.
    let (_hub2, _, _serving) = hub(&Path::new(EXAMPLE).join("1-no-policy"), hub_addr).await;
    wait_for(&replica, "cluster-1 fresh from the restarted hub", |r| {
        status(r, "cluster-1").is_some_and(|s| s.connected && !s.expired)
            && !has_pod(r, "cluster-1", "demo-c1", "late")
            && has_pod(r, "cluster-1", "demo-c1", "tmp-client")
    })
    .await;
    assert_eq!(verdict(&replica.read().expect("lock"), from, to), Deny);
}

#[tokio::test]
async fn the_first_source_to_name_a_cluster_keeps_it() {
    let tracker = Tracker::new(View::new("e", 100), 1 << 20);
    let mut replica = Replica::new();
    let url = tracking::serve(&tracker).await;
    let mut stream = tracking::subscribe_all(&url).await;
    let synced = |cluster: &str| pb::ClusterStatus {
        cluster: cluster.into(),
        synced: true,
        connected: true,
        ..Default::default()
    };
    let from = |pods: Vec<Object>, cluster: &str| Change {
        upserts: pods,
        clusters: vec![synced(cluster)],
        ..Change::default()
    };
    tracker.apply_from("first", from(vec![pod("c1", "a", "one", "10.0.0.1")], "c1"));
    tracker.apply_from(
        "second",
        from(vec![pod("c1", "a", "impostor", "10.0.0.2")], "c1"),
    );
    tracker.apply_from(
        "second",
        from(vec![pod("c2", "a", "two", "10.0.0.3")], "c2"),
    );
    tracking::until(
        &mut stream,
        &mut replica,
        "c2 from the second source",
        |r| has_pod(r, "c2", "a", "two"),
    )
    .await;
    assert!(has_pod(&replica, "c1", "a", "one"));
    assert!(!has_pod(&replica, "c1", "a", "impostor"), "refused");

    // Once the first source lets go of it, the cluster is free.
    tracker.apply_from(
        "first",
        Change {
            removed_clusters: vec![ClusterId::new("c1").expect("id")],
            ..Change::default()
        },
    );
    tracker.apply_from(
        "second",
        from(vec![pod("c1", "a", "successor", "10.0.0.2")], "c1"),
    );
    tracking::until(
        &mut stream,
        &mut replica,
        "c1 from the second source",
        |r| has_pod(r, "c1", "a", "successor"),
    )
    .await;
    assert!(!has_pod(&replica, "c1", "a", "one"));
}

fn weft(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(args)
        .output()
        .expect("run weft")
}

#[test]
fn two_sources_of_one_cluster_and_a_spoke_without_its_own_are_refused_at_start() {
    let kubeconfigs = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        kubeconfigs.path().join("config"),
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: \"http://127.0.0.1:1\"}\ncontexts:\n- name: cluster-1\n  context: {cluster: c, user: u}\nusers:\n- name: u\n  user: {token: t}\n",
    )
    .expect("write");
    let clusters = format!("{EXAMPLE}/1-no-policy");
    let kube = kubeconfigs.path().display().to_string();
    let common = [
        "tracker",
        "--insecure",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    let mut args = common.to_vec();
    args.extend(["--clusters", &clusters, "--kubeconfig-dir", &kube]);
    let out = weft(&args);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cluster cluster-1 is claimed by both"),
        "{stderr}"
    );

    let mut args = common.to_vec();
    args.extend([
        "--clusters",
        &clusters,
        "--upstream",
        "http://127.0.0.1:1",
        "--cluster",
        "cluster-9",
    ]);
    let out = weft(&args);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "--cluster cluster-9: no --clusters, --kubeconfig-dir or --in-cluster source names it"
        ),
        "{stderr}"
    );
    let out = weft(&[
        "tracker",
        "--insecure",
        "--clusters",
        &clusters,
        "--cluster",
        "cluster-1",
    ]);
    assert!(!out.status.success(), "--cluster needs --upstream");
}
