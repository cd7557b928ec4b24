//! The tracker over Kubernetes API servers (the test API server of `tests/apiserver`), named
//! by a directory of kubeconfig files, to a subscriber's replica: initial lists, events, a
//! relist after 410 Gone, faults, and kubeconfig files added and removed at run time.

mod apiserver;
mod tracking;

use std::time::Duration;

use apiserver::{ApiServer, Fault, Kind};
use serde_json::json;
use tracking::{serve, status, until};
use weft::tracker::client;
use weft::tracker::replica::Replica;
use weft::tracker::server::Tracker;
use weft::tracker::source::kubernetes::watch_kubeconfigs;
use weft::tracker::view::View;
use weft::tracker::wire::pb;

fn kubeconfig(contexts: &[(&str, &ApiServer)]) -> String {
    let mut clusters = String::new();
    let mut ctxs = String::new();
    for (name, server) in contexts {
        clusters.push_str(&format!(
            "- name: {name}\n  cluster: {{server: \"{}\"}}\n",
            server.url()
        ));
        ctxs.push_str(&format!(
            "- name: {name}\n  context: {{cluster: {name}, user: u}}\n"
        ));
    }
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n{clusters}contexts:\n{ctxs}users:\n- name: u\n  user: {{token: t}}\n"
    )
}

async fn cluster(name: &str) -> ApiServer {
    let s = ApiServer::start().await;
    s.apply(
        Kind::Namespace,
        json!({"metadata": {"name": "kube-system"}}),
    );
    s.apply(
        Kind::Namespace,
        json!({"metadata": {"name": "demo", "labels": {"team": name}}}),
    );
    s
}

fn pod(name: &str, ip: &str) -> serde_json::Value {
    json!({"metadata": {"name": name, "namespace": "demo", "labels": {"app": "web"}},
           "status": {"phase": "Running", "podIP": ip}})
}

fn has_pod(r: &Replica, cluster: &str, name: &str) -> bool {
    r.engine().pod_by_name(cluster, "demo", name).is_some()
}

#[tokio::test]
async fn kubeconfig_clusters_stream_to_a_replica() {
    let a = cluster("a").await;
    let b = cluster("b").await;
    a.apply(Kind::Pod, pod("web-a", "10.1.0.1"));
    b.apply(Kind::Pod, pod("web-b", "10.2.0.1"));
    b.apply(
        Kind::NetworkPolicy,
        json!({"metadata": {"name": "deny", "namespace": "demo"}, "spec": {"podSelector": {}}}),
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    std::fs::write(
        dir.join("both.yaml"),
        kubeconfig(&[("cluster-a", &a), ("cluster-b", &b)]),
    )
    .expect("write");
    std::fs::write(
        dir.join("bad-name.yaml"),
        kubeconfig(&[("Not_A_Valid_Id!", &a)]),
    )
    .expect("write");

    let tracker = Tracker::new(View::new("e", 10_000), 1 << 20);
    tokio::spawn(watch_kubeconfigs(
        dir.clone(),
        Default::default(),
        tracker.clone(),
        Duration::from_millis(50),
        Duration::from_millis(300),
    ));
    let url = serve(&tracker).await;
    let mut c = client::connect(&url).await.expect("connect");
    let request = pb::SubscribeRequest {
        policy_scope: pb::PolicyScope::AllClusters.into(),
        ..Default::default()
    };
    let mut stream = c.subscribe(request).await.expect("subscribe").into_inner();
    let mut r = Replica::new();
    until(&mut stream, &mut r, "both clusters synced", |r| {
        r.ready() && r.clusters().count() == 2
    })
    .await;
    assert!(has_pod(&r, "cluster-a", "web-a") && has_pod(&r, "cluster-b", "web-b"));
    assert_eq!(r.engine().counts().2, 1, "cluster-b's policy");
    let uid = |c| {
        status(&r, c)
            .map(|s| s.unique_id.clone())
            .unwrap_or_default()
    };
    assert!(
        uid("cluster-a").starts_with("uid-Namespace--kube-system"),
        "the kube-system UID identifies the cluster: {}",
        uid("cluster-a")
    );
    assert_ne!(uid("cluster-a"), uid("cluster-b"));
    assert!(
        status(&r, "Not_A_Valid_Id!").is_none(),
        "an invalid context name is refused"
    );

    // A policy the API server took but weft cannot read stands in as deny-all.
    a.apply(Kind::Pod, pod("peer", "10.1.0.9"));
    a.apply(
        Kind::NetworkPolicy,
        json!({"metadata": {"name": "odd", "namespace": "demo"}, "spec": {"podSelector": {},
               "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/8"]}}]}]}}),
    );
    until(&mut stream, &mut r, "the stand-in", |r| {
        status(r, "cluster-a").is_some_and(|s| s.error.contains("strictly inside"))
            && r.engine().counts().2 == 2
    })
    .await;
    let e = r.engine();
    let at = |ip: &str| e.address_endpoint(ip.parse().expect("ip"));
    let conn = weft::policy::Connection {
        src: at("10.1.0.9"),
        dst: at("10.1.0.1"),
        port: 80,
        protocol: weft::model::Protocol::Tcp,
    };
    let explained = e.explain(&conn, &e.decide(&conn));
    assert_eq!(explained.ingress.policies, ["cluster-a/demo/odd"]);
    assert_eq!(explained.verdict, weft::policy::Verdict::Deny);
    a.delete(Kind::NetworkPolicy, "demo", "odd");
    a.delete(Kind::Pod, "demo", "peer");

    // Events.
    a.delete(Kind::Pod, "demo", "web-a");
    a.apply(Kind::Pod, pod("web-a2", "10.1.0.2"));
    until(&mut stream, &mut r, "the events", |r| {
        !has_pod(r, "cluster-a", "web-a") && has_pod(r, "cluster-a", "web-a2")
    })
    .await;

    // The watch expires while a pod is deleted: the relist drops it.
    a.set_fault(Fault::Hang);
    a.delete(Kind::Pod, "demo", "web-a2");
    a.compact();
    a.set_fault(Fault::None);
    until(&mut stream, &mut r, "the relist", |r| {
        !has_pod(r, "cluster-a", "web-a2")
    })
    .await;

    // A server of cluster-a that admits cluster-b's team: an allow that depends on b's data.
    a.apply(
        Kind::Pod,
        json!({"metadata": {"name": "srv", "namespace": "demo", "labels": {"app": "srv"}},
               "status": {"phase": "Running", "podIP": "10.1.0.5"}}),
    );
    a.apply(
        Kind::NetworkPolicy,
        json!({"metadata": {"name": "from-b", "namespace": "demo"}, "spec": {
               "podSelector": {"matchLabels": {"app": "srv"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "b"}}}]}]}}),
    );
    let b_to_srv = |r: &Replica| {
        let e = r.engine();
        let at = |ip: &str| e.address_endpoint(ip.parse().expect("ip"));
        let conn = weft::policy::Connection {
            src: at("10.2.0.1"),
            dst: at("10.1.0.5"),
            port: 80,
            protocol: weft::model::Protocol::Tcp,
        };
        e.explain(&conn, &e.decide(&conn))
    };
    until(&mut stream, &mut r, "the allow from b", |r| {
        b_to_srv(r).ingress.why == weft::policy::Why::Allowed
    })
    .await;

    // A failing API server: its last state stays (fail static), its status says so; past the
    // maximum staleness its pods stop matching selectors, so the allow fails closed.
    b.set_fault(Fault::InternalError);
    b.close_watches();
    until(&mut stream, &mut r, "b's error", |r| {
        status(r, "cluster-b").is_some_and(|s| !s.error.is_empty() && !s.connected)
    })
    .await;
    assert!(
        has_pod(&r, "cluster-b", "web-b"),
        "fail static: the last state is kept"
    );
    until(&mut stream, &mut r, "b expiring", |r| {
        status(r, "cluster-b").is_some_and(|s| s.expired && s.stale_for_ms >= 300)
    })
    .await;
    let e = b_to_srv(&r);
    assert_eq!(e.verdict, weft::policy::Verdict::Deny);
    assert!(
        e.ingress.notes[0].contains("older than the maximum staleness"),
        "{:?}",
        e.ingress.notes
    );
    b.set_fault(Fault::None);
    tokio::time::sleep(Duration::from_secs(5)).await;
    eprintln!("DEBUG requests after: {:?}", b.requests().len());
    until(&mut stream, &mut r, "b back", |r| {
        eprintln!(
            "DEBUG {:?} {:?}",
            b_to_srv(r).ingress,
            status(r, "cluster-b").map(|s| (s.connected, s.expired, s.stale_for_ms, s.synced))
        );
        b_to_srv(r).ingress.why == weft::policy::Why::Allowed
    })
    .await;
    assert!(status(&r, "cluster-b").is_some_and(|s| !s.expired && s.stale_for_ms == 0));

    // The kubeconfig file goes away: its clusters leave the view.
    std::fs::remove_file(dir.join("both.yaml")).expect("rm");
    until(&mut stream, &mut r, "the clusters leaving", |r| {
        r.clusters().count() == 0
    })
    .await;
    assert_eq!(r.engine().counts().0, 0);

    // A new file brings a cluster back.
    std::fs::write(dir.join("a.yaml"), kubeconfig(&[("cluster-a", &a)])).expect("write");
    until(&mut stream, &mut r, "cluster-a again", |r| {
        status(r, "cluster-a").is_some_and(|s| s.synced)
    })
    .await;
}
