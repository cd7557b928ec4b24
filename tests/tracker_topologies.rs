//! The tracker's topologies over Kubernetes (test API servers named by kubeconfig files): a
//! full mesh of two trackers each watching both clusters, and a hub with two spokes, each
//! spoke watching its own cluster and taking the other from the hub; both converge, carry
//! changes, keep a lost cluster's last state (stale, then expired: allows that depend on its
//! pods fail closed) and recover. And two correctness rules of the stream: a pod that reuses
//! an address survives the late delete of the pod it replaced, in another namespace (events
//! reordered) or another cluster; a namespace's forged cluster label is corrected.

mod apiserver;
mod tracking;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use apiserver::{ApiServer, Fault, Kind, kubeconfig};
use serde_json::{Value, json};
use tracking::{
    connection, has_pod, kube_tracker, pod_at, pod_named, serve, serve_on, status, subscriber,
    verdict, wait_for,
};
use weft::model::ClusterId;
use weft::model::labels::CLUSTER_LABELS;
use weft::policy::Verdict::{self, Allow, Deny};
use weft::tracker::replica::Replica;
use weft::tracker::source::upstream;

const MAX_STALENESS: Duration = Duration::from_millis(500);
/// A spoke's retry after losing its hub.
const RETRY: Duration = Duration::from_millis(50);

/// The pods of [`clusters`], as `cluster/namespace/name`.
const PODS: [&str; 4] = [
    "cluster-a/front/web",
    "cluster-a/front/web-2",
    "cluster-b/back/srv",
    "cluster-b/back/peer",
];

fn pod(namespace: &str, name: &str, app: &str, ip: &str) -> Value {
    json!({"metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
           "status": {"phase": "Running", "podIP": ip}})
}

/// A policy of `namespace` selecting the pods labelled `app` and admitting, on ingress, the
/// pods of the namespaces labelled `namespaces`.
fn admit(namespace: &str, name: &str, app: &str, namespaces: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": namespace}, "spec": {
           "podSelector": {"matchLabels": {"app": app}},
           "ingress": [{"from": [{"namespaceSelector": {"matchLabels": namespaces}}]}]}})
}

/// Two API servers. cluster-a: namespace `front` with pods `web` (10.1.0.1) and `web-2`
/// (10.1.0.2), the `web` pods admitting cluster-b's namespaces. cluster-b: namespace `back`
/// with pods `srv` (10.2.0.1) and `peer` (10.2.0.2), `srv` admitting cluster-a's
/// namespaces only. Both have a kube-system namespace.
async fn clusters() -> (ApiServer, ApiServer) {
    let (a, b) = (ApiServer::start().await, ApiServer::start().await);
    for (s, ns) in [(&a, "front"), (&b, "back")] {
        for name in ["kube-system", ns] {
            s.apply(Kind::Namespace, json!({"metadata": {"name": name}}));
        }
    }
    a.apply(Kind::Pod, pod("front", "web", "web", "10.1.0.1"));
    a.apply(Kind::Pod, pod("front", "web-2", "web", "10.1.0.2"));
    a.apply(
        Kind::NetworkPolicy,
        admit(
            "front",
            "from-b",
            "web",
            json!({"cluster.clusterset.k8s.io": "cluster-b"}),
        ),
    );
    b.apply(Kind::Pod, pod("back", "srv", "srv", "10.2.0.1"));
    b.apply(Kind::Pod, pod("back", "peer", "peer", "10.2.0.2"));
    b.apply(
        Kind::NetworkPolicy,
        admit(
            "back",
            "from-a",
            "srv",
            json!({"cluster.clusterset.k8s.io": "cluster-a"}),
        ),
    );
    (a, b)
}

/// A directory holding one kubeconfig file with a context per (cluster id, server).
fn kubeconfig_dir(contexts: &[(&str, &ApiServer)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("clusters.yaml"), kubeconfig(contexts)).expect("write");
    dir
}

/// The verdict between every ordered pair of `pods`, once `replica` holds them all.
fn verdicts(replica: &Replica, pods: &[&str]) -> Option<Vec<Verdict>> {
    if !pods.iter().all(|p| pod_named(replica, p).is_some()) {
        return None;
    }
    let mut all = Vec::new();
    for from in pods {
        for to in pods.iter().filter(|to| *to != from) {
            all.push(verdict(replica, from, to));
        }
    }
    Some(all)
}

/// The status of `cluster` in `replica` says it is fresh.
fn fresh(replica: &Replica, cluster: &str) -> bool {
    status(replica, cluster).is_some_and(|s| s.synced && s.connected && !s.expired)
}

/// The status of `cluster` in `replica` says it is lost, for more than `ms`.
fn lost_for(replica: &Replica, cluster: &str, ms: u64) -> bool {
    status(replica, cluster).is_some_and(|s| !s.connected && s.stale_for_ms > ms)
}

/// The status of `cluster` in `replica` says it is expired: lost for longer than the maximum
/// staleness.
fn expired(replica: &Replica, cluster: &str) -> bool {
    let limit = u64::try_from(MAX_STALENESS.as_millis()).expect("ms");
    status(replica, cluster).is_some_and(|s| s.expired && s.stale_for_ms > limit)
}

fn read(replica: &RwLock<Replica>) -> std::sync::RwLockReadGuard<'_, Replica> {
    replica.read().expect("lock")
}

#[tokio::test]
async fn full_mesh_two_trackers_each_watching_both_clusters() {
    let (a, b) = clusters().await;
    let contexts = [("cluster-a", &a), ("cluster-b", &b)];
    let (dir1, dir2) = (kubeconfig_dir(&contexts), kubeconfig_dir(&contexts));
    let mut replicas = Vec::new();
    for dir in [&dir1, &dir2] {
        let tracker = kube_tracker(dir.path(), &[], MAX_STALENESS);
        replicas.push(subscriber(serve(&tracker).await));
    }
    let (web, srv) = ("cluster-a/front/web", "cluster-b/back/srv");

    // Both converge on one view: the same pods, the same verdicts across the clusters.
    for r in &replicas {
        wait_for(r, "both clusters synced", |r| {
            r.ready()
                && fresh(r, "cluster-a")
                && fresh(r, "cluster-b")
                && verdicts(r, &PODS).is_some()
        })
        .await;
    }
    let seen: Vec<_> = replicas
        .iter()
        .map(|r| {
            let r = read(r);
            (r.engine().counts(), verdicts(&r, &PODS))
        })
        .collect();
    assert_eq!(seen[0], seen[1], "one view in both replicas");
    {
        let r = read(&replicas[0]);
        assert_eq!(verdict(&r, web, srv), Allow, "srv admits cluster-a");
        assert_eq!(verdict(&r, "cluster-b/back/peer", srv), Deny);
        assert_eq!(verdict(&r, srv, web), Allow, "web admits cluster-b");
    }

    // A pod added and one deleted in cluster-a reach both.
    a.apply(Kind::Pod, pod("front", "late", "web", "10.1.0.3"));
    a.delete(Kind::Pod, "front", "web-2");
    for r in &replicas {
        wait_for(r, "cluster-a's events", |r| {
            has_pod(r, "cluster-a", "front", "late") && !has_pod(r, "cluster-a", "front", "web-2")
        })
        .await;
        assert_eq!(verdict(&read(r), "cluster-a/front/late", srv), Allow);
    }

    // cluster-a's API server goes down: both keep its last state, stale and aging, then
    // expired, when the allow that depends on its pods fails closed; a deny stays.
    a.set_fault(Fault::Down);
    for r in &replicas {
        wait_for(r, "cluster-a stale", |r| lost_for(r, "cluster-a", 0)).await;
        let since = status(&read(r), "cluster-a").map_or(0, |s| s.stale_for_ms);
        wait_for(r, "cluster-a's staleness growing", |r| {
            lost_for(r, "cluster-a", since)
        })
        .await;
    }
    for r in &replicas {
        wait_for(r, "cluster-a expired", |r| expired(r, "cluster-a")).await;
        let r = read(r);
        assert!(
            has_pod(&r, "cluster-a", "front", "web"),
            "fail static: the pods stay"
        );
        assert!(fresh(&r, "cluster-b"), "cluster-b is not affected");
        assert_eq!(verdict(&r, web, srv), Deny, "the allow fails closed");
        assert_eq!(verdict(&r, "cluster-b/back/peer", srv), Deny);
        assert_eq!(
            verdict(&r, srv, web),
            Allow,
            "cluster-a's own policy still admits the fresh cluster-b"
        );
    }

    // A change made while it was down arrives once it is back, and the allow with it.
    a.apply(Kind::Pod, pod("front", "meanwhile", "web", "10.1.0.4"));
    a.set_fault(Fault::None);
    for r in &replicas {
        wait_for(r, "cluster-a back", |r| {
            fresh(r, "cluster-a")
                && has_pod(r, "cluster-a", "front", "meanwhile")
                && verdict(r, web, srv) == Allow
        })
        .await;
        assert_eq!(
            status(&read(r), "cluster-a").map(|s| s.stale_for_ms),
            Some(0)
        );
    }
}

#[tokio::test]
async fn hub_and_two_spokes() {
    let (a, b) = clusters().await;
    let hub_dir = kubeconfig_dir(&[("cluster-a", &a), ("cluster-b", &b)]);
    let hub = serve_on(
        &kube_tracker(hub_dir.path(), &[], MAX_STALENESS),
        ([127, 0, 0, 1], 0).into(),
    )
    .await;
    // Each spoke watches its own cluster and follows the hub for the other.
    let (mut spokes, mut kubeconfig_dirs) = (Vec::new(), Vec::new());
    for (own, server) in [("cluster-a", &a), ("cluster-b", &b)] {
        let dir = kubeconfig_dir(&[(own, server)]);
        let spoke = kube_tracker(dir.path(), &[], MAX_STALENESS);
        tokio::spawn(upstream::follow(
            hub.target.clone(),
            ClusterId::new(own).expect("id"),
            spoke.clone(),
            MAX_STALENESS,
            RETRY,
        ));
        spokes.push(subscriber(serve(&spoke).await));
        kubeconfig_dirs.push(dir);
    }
    let (ra, rb) = (&spokes[0], &spokes[1]);
    let (web, srv, peer) = (
        "cluster-a/front/web",
        "cluster-b/back/srv",
        "cluster-b/back/peer",
    );

    // Each spoke's subscriber sees both clusters: its own from its watch, the other via the
    // hub, and decides across them.
    for r in [ra, rb] {
        wait_for(r, "both clusters", |r| {
            r.ready() && verdicts(r, &PODS).is_some()
        })
        .await;
        let r = read(r);
        assert_eq!(verdict(&r, web, srv), Allow);
        assert_eq!(verdict(&r, peer, web), Allow);
        assert_eq!(verdict(&r, peer, srv), Deny);
    }

    // A change in cluster-b: API server, hub, spoke A, spoke A's subscriber.
    b.apply(Kind::Pod, pod("back", "late", "peer", "10.2.0.3"));
    wait_for(ra, "cluster-b's new pod via the hub", |r| {
        has_pod(r, "cluster-b", "back", "late")
    })
    .await;
    assert_eq!(verdict(&read(ra), "cluster-b/back/late", web), Allow);

    // The hub stops: spoke A keeps cluster-b (fail static), disconnected and aging, then
    // expired, when the allow that depends on cluster-b's pods fails closed. Its own
    // cluster-a is fresh all along.
    let hub_addr = hub.addr;
    hub.stop().await;
    wait_for(ra, "cluster-b disconnected", |r| {
        lost_for(r, "cluster-b", 0) && status(r, "cluster-b").is_some_and(|s| !s.error.is_empty())
    })
    .await;
    assert!(has_pod(&read(ra), "cluster-b", "back", "late"));
    wait_for(ra, "cluster-b expired", |r| expired(r, "cluster-b")).await;
    {
        let r = read(ra);
        assert!(fresh(&r, "cluster-a"), "{:?}", status(&r, "cluster-a"));
        assert!(has_pod(&r, "cluster-b", "back", "srv"), "fail static");
        assert_eq!(verdict(&r, peer, web), Deny, "the allow fails closed");
        assert_eq!(verdict(&r, web, srv), Allow, "cluster-a's pods still match");
    }
    // Spoke B likewise holds cluster-a expired.
    wait_for(rb, "cluster-a expired in spoke B", |r| {
        expired(r, "cluster-a")
            && fresh(r, "cluster-b")
            && verdicts(r, &PODS).is_some()
            && verdict(r, web, srv) == Deny
    })
    .await;

    // Meanwhile cluster-b changes; a hub restarted on the same port brings the spokes the
    // change, fresh statuses, and the allows back. The restarted hub is cold: until it has
    // synced cluster-b, spoke A's subscriber keeps cluster-b as it was, never empty.
    b.delete(Kind::Pod, "back", "late");
    let lost = Arc::new(AtomicBool::new(false));
    let watch = {
        let (replica, lost) = (ra.clone(), lost.clone());
        tokio::spawn(async move {
            loop {
                if !has_pod(&read(&replica), "cluster-b", "back", "srv") {
                    lost.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let _hub = serve_on(&kube_tracker(hub_dir.path(), &[], MAX_STALENESS), hub_addr).await;
    wait_for(ra, "cluster-b fresh again", |r| {
        fresh(r, "cluster-b")
            && verdicts(r, &PODS).is_some()
            && !has_pod(r, "cluster-b", "back", "late")
            && verdict(r, peer, web) == Allow
    })
    .await;
    watch.abort();
    assert!(
        !lost.load(Ordering::SeqCst),
        "cluster-b was never emptied by the cold hub"
    );
    wait_for(rb, "cluster-a fresh again in spoke B", |r| {
        fresh(r, "cluster-a") && verdicts(r, &PODS).is_some() && verdict(r, web, srv) == Allow
    })
    .await;
}

#[tokio::test]
async fn a_reused_address_survives_the_late_delete_of_its_old_pod() {
    let (a, b) = clusters().await;
    for ns in ["n1", "n2"] {
        a.apply(Kind::Namespace, json!({"metadata": {"name": ns}}));
    }
    a.apply(Kind::Pod, pod("n1", "old", "app", "10.1.9.9"));
    // A guard in cluster-b admits namespace n2 only, of any cluster.
    b.apply(Kind::Pod, pod("back", "guard", "guard", "10.2.0.9"));
    b.apply(
        Kind::NetworkPolicy,
        admit(
            "back",
            "from-n2",
            "guard",
            json!({"kubernetes.io/metadata.name": "n2"}),
        ),
    );
    let dir = kubeconfig_dir(&[("cluster-a", &a), ("cluster-b", &b)]);
    let r = subscriber(serve(&kube_tracker(dir.path(), &[], MAX_STALENESS)).await);
    let to_guard = |r: &Replica| {
        let e = r.engine();
        e.decide(&connection(e, "10.1.9.9", "10.2.0.9")).verdict()
    };
    wait_for(&r, "old at its address", |r| {
        r.ready() && pod_at(r, "10.1.9.9").as_deref() == Some("cluster-a/n1/old")
    })
    .await;
    assert_eq!(to_guard(&read(&r)), Deny, "n1 is not admitted");

    // old goes, new takes its address in another namespace; the watch delivers the new
    // pod's ADDED before the old one's DELETED.
    a.hold_events();
    a.delete(Kind::Pod, "n1", "old");
    a.apply(Kind::Pod, pod("n2", "new", "app", "10.1.9.9"));
    a.release_events_reversed();
    wait_for(&r, "both events", |r| {
        !has_pod(r, "cluster-a", "n1", "old") && has_pod(r, "cluster-a", "n2", "new")
    })
    .await;
    {
        let r = read(&r);
        assert_eq!(
            pod_at(&r, "10.1.9.9").as_deref(),
            Some("cluster-a/n2/new"),
            "the late delete left the new pod its address"
        );
        assert_eq!(to_guard(&r), Allow, "decided as new, of n2");
    }

    // One address in both clusters: ambiguous while both hold it; one deleted, the other
    // keeps it.
    a.apply(Kind::Pod, pod("front", "twin", "web", "10.9.0.9"));
    b.apply(Kind::Pod, pod("back", "twin", "peer", "10.9.0.9"));
    wait_for(&r, "both twins", |r| {
        r.engine().claimants("10.9.0.9".parse().expect("ip"))
            == ["cluster-a/front/twin", "cluster-b/back/twin"]
    })
    .await;
    assert_eq!(pod_at(&read(&r), "10.9.0.9"), None, "ambiguous");
    a.delete(Kind::Pod, "front", "twin");
    wait_for(&r, "cluster-a's twin gone", |r| {
        !has_pod(r, "cluster-a", "front", "twin")
    })
    .await;
    assert_eq!(
        pod_at(&read(&r), "10.9.0.9").as_deref(),
        Some("cluster-b/back/twin")
    );
}

#[tokio::test]
async fn a_forged_cluster_label_is_corrected() {
    let (a, b) = clusters().await;
    // A namespace of cluster-a that claims, under every cluster label, to be cluster-b's.
    let forged: serde_json::Map<String, Value> = CLUSTER_LABELS
        .iter()
        .map(|l| ((*l).to_owned(), json!("cluster-b")))
        .collect();
    a.apply(
        Kind::Namespace,
        json!({"metadata": {"name": "forged", "labels": forged}}),
    );
    a.apply(Kind::Pod, pod("forged", "intruder", "x", "10.1.6.6"));
    // A vault in cluster-b admits cluster-b's namespaces, by each cluster label.
    b.apply(Kind::Pod, pod("back", "vault", "vault", "10.2.0.7"));
    for (i, label) in CLUSTER_LABELS.iter().enumerate() {
        b.apply(
            Kind::NetworkPolicy,
            admit(
                "back",
                &format!("own-{i}"),
                "vault",
                json!({ *label: "cluster-b" }),
            ),
        );
    }
    let dir = kubeconfig_dir(&[("cluster-a", &a), ("cluster-b", &b)]);
    let r = subscriber(serve(&kube_tracker(dir.path(), &[], MAX_STALENESS)).await);
    let vault = "cluster-b/back/vault";
    wait_for(&r, "both clusters", |r| {
        r.ready()
            && has_pod(r, "cluster-a", "forged", "intruder")
            && has_pod(r, "cluster-b", "back", "vault")
            && r.engine().counts().2 == 2 + CLUSTER_LABELS.len()
    })
    .await;
    let r = read(&r);
    let labels = r
        .engine()
        .namespace_labels(&ClusterId::new("cluster-a").expect("id"), "forged")
        .expect("the namespace");
    for label in CLUSTER_LABELS {
        assert_eq!(labels.get(label).map(String::as_str), Some("cluster-a"));
    }
    let intruder = "cluster-a/forged/intruder";
    assert_eq!(verdict(&r, intruder, vault), Deny, "not cluster-b's");
    assert_eq!(verdict(&r, "cluster-b/back/peer", vault), Allow);
    assert_eq!(
        verdict(&r, intruder, "cluster-b/back/srv"),
        Allow,
        "cluster-a's, as srv admits"
    );
}
