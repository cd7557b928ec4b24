//! The tracker over Kubernetes API servers (the test API server of `tests/apiserver`), named
//! by a directory of kubeconfig files, to a subscriber's replica: initial lists, events, a
//! relist after 410 Gone, faults, kubeconfig files added and removed at run time, cluster ids
//! (ClusterProperty, mapping, context name), and token, client-certificate and exec
//! authentication.

mod apiserver;
mod tracking;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use apiserver::{ApiServer, Fault, Kind, kubeconfig, kubeconfig_with};
use serde_json::json;
use tracking::{connection, kube_tracker, serve, status, until};
use weft::tracker::client;
use weft::tracker::replica::Replica;
use weft::tracker::wire::pb;

/// A tracker watching the kubeconfig files of `dir` (`names` maps contexts to ids), and a
/// subscriber's stream of it with its replica.
async fn follow(dir: &Path, names: &[(&str, &str)]) -> (tonic::Streaming<pb::Update>, Replica) {
    let tracker = kube_tracker(dir, names, Duration::from_millis(300));
    let url = serve(&tracker).await;
    let mut c = client::connect(&url).await.expect("connect");
    let request = pb::SubscribeRequest {
        policy_scope: pb::PolicyScope::AllClusters.into(),
        ..Default::default()
    };
    let stream = c.subscribe(request).await.expect("subscribe").into_inner();
    (stream, Replica::new())
}

/// Applies what the stream brings for `time`.
async fn drain(stream: &mut tonic::Streaming<pb::Update>, r: &mut Replica, time: Duration) {
    let forever = until(stream, r, "nothing", |_| false);
    let _ = tokio::time::timeout(time, forever).await;
}

fn synced(r: &Replica, cluster: &str) -> bool {
    status(r, cluster).is_some_and(|s| s.synced && s.connected && s.error.is_empty())
}

fn cluster_names(r: &Replica) -> BTreeSet<String> {
    r.clusters().map(|s| s.cluster.clone()).collect()
}

fn property(id: &str) -> serde_json::Value {
    json!({"metadata": {"name": "cluster.clusterset.k8s.io"}, "spec": {"value": id}})
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
    tracking::has_pod(r, cluster, "demo", name)
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

    let (mut stream, mut r) = follow(&dir, &[]).await;
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
    let conn = connection(e, "10.1.0.9", "10.1.0.1");
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
        let conn = connection(e, "10.2.0.1", "10.1.0.5");
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
    until(&mut stream, &mut r, "b back", |r| {
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

#[tokio::test]
async fn cluster_ids_come_from_the_cluster_property_then_the_mapping_then_the_context_name() {
    // Its ClusterProperty wins over both the mapping and the context name.
    let prop = cluster("a").await;
    prop.apply(Kind::ClusterProperty, property("prop-a"));
    prop.apply(Kind::Pod, pod("web-a", "10.1.0.1"));
    // No ClusterProperty (the kind is served): the mapping.
    let mapped = cluster("b").await;
    mapped.apply(Kind::Pod, pod("web-b", "10.2.0.1"));
    // No ClusterProperty kind at all (a plain-text 404), no mapping: the context name.
    let named = cluster("c").await;
    named.set_installed(Kind::ClusterProperty, false);
    named.apply(Kind::Pod, pod("web-c", "10.3.0.1"));
    // A context name that is no cluster id does not matter when the cluster names itself.
    let odd = cluster("e").await;
    odd.apply(Kind::ClusterProperty, property("prop-e"));
    odd.apply(Kind::Pod, pod("web-e", "10.5.0.1"));
    // A ClusterProperty that is no cluster id.
    let bad = cluster("d").await;
    bad.apply(Kind::ClusterProperty, property("Not A Valid Id!"));
    bad.apply(Kind::Pod, pod("web-d", "10.4.0.1"));
    // A second cluster naming itself prop-a: one of the two is refused.
    let twin = cluster("f").await;
    twin.apply(Kind::ClusterProperty, property("prop-a"));
    twin.apply(Kind::Pod, pod("web-f", "10.6.0.1"));

    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tmp.path().join("clusters.yaml"),
        kubeconfig(&[
            ("ctx-a", &prop),
            ("ctx-b", &mapped),
            ("ctx-c", &named),
            ("Not_A_Valid_Id!", &odd),
            ("ctx-d", &bad),
        ]),
    )
    .expect("write");
    std::fs::write(
        tmp.path().join("twin.yaml"),
        kubeconfig(&[("ctx-twin", &twin)]),
    )
    .expect("write");
    let names = [("ctx-a", "mapped-a"), ("ctx-b", "mapped-b")];
    let (mut stream, mut r) = follow(tmp.path(), &names).await;
    until(&mut stream, &mut r, "the clusters under their ids", |r| {
        ["prop-a", "mapped-b", "ctx-c", "prop-e"]
            .iter()
            .all(|c| synced(r, c))
            && status(r, "ctx-d").is_some_and(|s| !s.error.is_empty())
            // Every context resolved: a context still resolving is there under its
            // fallback id, unsynced.
            && ["mapped-a", "ctx-twin"].iter().all(|c| status(r, c).is_none())
    })
    .await;
    assert!(has_pod(&r, "mapped-b", "web-b") && has_pod(&r, "ctx-c", "web-c"));
    assert!(has_pod(&r, "prop-e", "web-e"));
    assert_ne!(
        has_pod(&r, "prop-a", "web-a"),
        has_pod(&r, "prop-a", "web-f"),
        "prop-a is one cluster's, the other is refused"
    );
    assert_eq!(
        cluster_names(&r),
        ["ctx-c", "ctx-d", "mapped-b", "prop-a", "prop-e"]
            .map(String::from)
            .into(),
        "no cluster under a mapping or a context name its ClusterProperty overrides"
    );
    // The bad value: said under the fallback id, which serves nothing.
    let d = status(&r, "ctx-d").expect("ctx-d");
    assert!(
        d.error.contains("ctx-d") && d.error.contains("\"Not A Valid Id!\""),
        "{}",
        d.error
    );
    assert!(!d.synced && !d.connected && !r.ready());
    assert!(!has_pod(&r, "ctx-d", "web-d"));

    // Mended, it is watched under its id and the placeholder goes.
    bad.apply(Kind::ClusterProperty, property("prop-d"));
    until(&mut stream, &mut r, "prop-d", |r| {
        synced(r, "prop-d") && status(r, "ctx-d").is_none()
    })
    .await;
    assert!(has_pod(&r, "prop-d", "web-d"));
    until(&mut stream, &mut r, "every cluster synced", Replica::ready).await;
}

#[tokio::test]
async fn an_unreachable_cluster_is_unsynced_under_its_fallback_id_until_it_names_itself() {
    let s = cluster("x").await;
    s.apply(Kind::ClusterProperty, property("real-x"));
    s.apply(Kind::Pod, pod("web-x", "10.7.0.1"));
    s.set_fault(Fault::Down);
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("x.yaml"), kubeconfig(&[("ctx-x", &s)])).expect("write");
    let (mut stream, mut r) = follow(tmp.path(), &[]).await;
    until(&mut stream, &mut r, "the placeholder", |r| {
        status(r, "ctx-x").is_some_and(|s| s.error.starts_with("resolving cluster id"))
    })
    .await;
    let x = status(&r, "ctx-x").expect("ctx-x");
    assert!(!x.synced && !x.connected && !r.ready());

    s.set_fault(Fault::None);
    until(&mut stream, &mut r, "real-x", |r| {
        synced(r, "real-x") && status(r, "ctx-x").is_none()
    })
    .await;
    assert!(has_pod(&r, "real-x", "web-x"));
}

#[tokio::test]
async fn a_token_rotated_in_the_kubeconfig_file_is_picked_up() {
    let s = cluster("t").await;
    s.apply(Kind::Pod, pod("web-0", "10.8.0.9"));
    s.apply(Kind::Pod, pod("web-1", "10.8.0.1"));
    s.set_token(Some("one"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("t.yaml");
    let with_token =
        |token: &str| kubeconfig_with(&[("ctx-t", &s, &format!("{{token: {token}}}"))]);
    // A wrong token: unsynced, with the error.
    std::fs::write(&file, with_token("zero")).expect("write");
    let (mut stream, mut r) = follow(tmp.path(), &[]).await;
    until(&mut stream, &mut r, "refused", |r| {
        status(r, "ctx-t").is_some_and(|s| s.error.contains("401") && !s.synced)
    })
    .await;
    std::fs::write(&file, with_token("one")).expect("write");
    until(&mut stream, &mut r, "accepted", |r| synced(r, "ctx-t")).await;
    assert!(has_pod(&r, "ctx-t", "web-1"));

    // The server moves to a new token; its watches end and are refused again.
    s.set_token(Some("two"));
    s.close_watches();
    until(&mut stream, &mut r, "refused again", |r| {
        status(r, "ctx-t").is_some_and(|s| !s.error.is_empty() && !s.connected)
    })
    .await;
    // A rewrite with a token that does not work either: the running watchers keep saying how
    // the cluster is, its last state stale and, past the maximum staleness, expired.
    std::fs::write(&file, with_token("zero")).expect("write");
    drain(&mut stream, &mut r, Duration::from_secs(1)).await;
    let t = status(&r, "ctx-t").expect("ctx-t");
    assert!(
        t.expired && !t.error.starts_with("resolving cluster id"),
        "{t:?}"
    );
    assert!(has_pod(&r, "ctx-t", "web-1"));
    // The file is rewritten with the new token: no restart of the tracker.
    // Meanwhile a pod is deleted: the restarted watchers' first list must remove it.
    std::fs::write(&file, with_token("two")).expect("write");
    s.delete(Kind::Pod, "demo", "web-0");
    s.apply(Kind::Pod, pod("web-2", "10.8.0.2"));
    until(&mut stream, &mut r, "the new token used", |r| {
        synced(r, "ctx-t") && has_pod(r, "ctx-t", "web-2")
    })
    .await;
    assert!(
        has_pod(&r, "ctx-t", "web-1"),
        "the state was kept across the restart"
    );
    until(&mut stream, &mut r, "the pod deleted meanwhile gone", |r| {
        !has_pod(r, "ctx-t", "web-0")
    })
    .await;
}

#[tokio::test]
async fn client_certificate_authentication() {
    let s = ApiServer::start_tls().await;
    s.apply(
        Kind::Namespace,
        json!({"metadata": {"name": "kube-system"}}),
    );
    s.apply(Kind::Pod, pod("web", "10.9.0.1"));
    let pki = s.pki().expect("TLS");
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tmp.path().join("tls.yaml"),
        kubeconfig_with(&[
            ("with-cert", &s, &pki.user_entry()),
            ("without-cert", &s, "{token: t}"),
        ]),
    )
    .expect("write");
    let (mut stream, mut r) = follow(tmp.path(), &[]).await;
    until(&mut stream, &mut r, "the cluster over mutual TLS", |r| {
        synced(r, "with-cert") && status(r, "without-cert").is_some_and(|s| !s.error.is_empty())
    })
    .await;
    assert!(has_pod(&r, "with-cert", "web"));
    let refused = status(&r, "without-cert").expect("without-cert");
    assert!(
        refused.error.contains("CertificateRequired"),
        "the server asked for a certificate: {}",
        refused.error
    );
    assert!(!refused.synced && !has_pod(&r, "without-cert", "web"));
}

#[tokio::test]
async fn exec_authentication() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = cluster("x").await;
    s.apply(Kind::Pod, pod("web", "10.10.0.1"));
    s.set_token(Some("from-exec"));
    let tmp = tempfile::tempdir().expect("tempdir");
    // Outside the kubeconfig directory, which would read it as a kubeconfig.
    let plugin = tmp.path().join("credential.sh");
    std::fs::write(
        &plugin,
        "#!/bin/sh\necho '{\"apiVersion\": \"client.authentication.k8s.io/v1\", \
         \"kind\": \"ExecCredential\", \"status\": {\"token\": \"from-exec\"}}'\n",
    )
    .expect("write");
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dir = tmp.path().join("kubeconfigs");
    std::fs::create_dir(&dir).expect("mkdir");
    let user = format!(
        "{{exec: {{apiVersion: client.authentication.k8s.io/v1, command: \"{}\", interactiveMode: Never}}}}",
        plugin.display()
    );
    std::fs::write(
        dir.join("exec.yaml"),
        kubeconfig_with(&[("ctx-exec", &s, &user)]),
    )
    .expect("write");
    let (mut stream, mut r) = follow(&dir, &[]).await;
    until(&mut stream, &mut r, "the cluster", |r| {
        synced(r, "ctx-exec")
    })
    .await;
    assert!(has_pod(&r, "ctx-exec", "web"));
}

#[tokio::test]
async fn a_cluster_whose_id_is_still_being_resolved_keeps_the_view_unready() {
    let fast = cluster("a").await;
    fast.apply(Kind::Pod, pod("web-a", "10.1.0.1"));
    // Its API server takes the connection and never answers: its id is not resolved (for
    // kube's read timeout of minutes).
    let slow = cluster("b").await;
    slow.set_fault(Fault::Hang);
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tmp.path().join("both.yaml"),
        kubeconfig(&[("cluster-a", &fast), ("cluster-b", &slow)]),
    )
    .expect("write");
    let (mut stream, mut r) = follow(tmp.path(), &[]).await;
    until(&mut stream, &mut r, "cluster-a synced", |r| {
        synced(r, "cluster-a")
    })
    .await;
    let b = status(&r, "cluster-b").expect("cluster-b is there before it answers");
    assert!(!b.synced && !r.ready(), "{b:?}");
    assert!(b.error.is_empty(), "not an error, only not yet: {b:?}");
    assert!(has_pod(&r, "cluster-a", "web-a"));
}

#[tokio::test]
async fn identity_policies_are_watched_and_a_bad_one_denies_every_identity() {
    use weft::model::Protocol;
    use weft::policy::identity::IdentityVerdict;
    let a = cluster("a").await;
    a.apply(Kind::Pod, pod("web-a", "10.1.0.1"));
    a.apply(
        Kind::IdentityPolicy,
        json!({"metadata": {"name": "web", "namespace": "demo"},
               "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                        "rules": [{"from": [{"namespace": "demo", "serviceAccount": "client"}]}]}}),
    );
    // Another cluster without weft's resource installed: still synced.
    let b = cluster("b").await;
    b.set_installed(Kind::IdentityPolicy, false);
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        tmp.path().join("config"),
        kubeconfig(&[("ctx-a", &a), ("ctx-b", &b)]),
    )
    .expect("write");
    let (mut stream, mut r) = follow(tmp.path(), &[]).await;
    until(&mut stream, &mut r, "both clusters with a's policy", |r| {
        synced(r, "ctx-a") && synced(r, "ctx-b") && has_pod(r, "ctx-a", "web-a")
    })
    .await;
    let web = r
        .engine()
        .pod_by_name("ctx-a", "demo", "web-a")
        .expect("web");
    let id = |sa: &str| {
        weft::identity::WorkloadId::parse(&format!("spiffe://ctx-a/ns/demo/sa/{sa}")).expect("id")
    };
    let verdict = |r: &Replica, sa: &str| {
        r.engine()
            .decide_identity(web, 80, Protocol::Tcp, Some(&id(sa)))
            .enforced
    };
    assert!(verdict(&r, "client").passes());
    assert!(!verdict(&r, "other").passes());

    // A policy weft cannot read stands in as one that admits no identity.
    a.apply(
        Kind::IdentityPolicy,
        json!({"metadata": {"name": "web", "namespace": "demo"},
               "spec": {"podSelector": {}, "rules": [{"from": [{"serviceAccount": "a*"}]}]}}),
    );
    until(&mut stream, &mut r, "the stand-in", |r| {
        !r.engine()
            .decide_identity(web, 80, Protocol::Tcp, Some(&id("client")))
            .enforced
            .passes()
    })
    .await;
    assert!(
        status(&r, "ctx-a").is_some_and(|s| s.error.contains("serviceAccount")),
        "{:?}",
        status(&r, "ctx-a")
    );
    a.delete(Kind::IdentityPolicy, "demo", "web");
    until(&mut stream, &mut r, "the policy gone", |r| {
        r.engine()
            .decide_identity(web, 80, Protocol::Tcp, None)
            .enforced
            == IdentityVerdict::NotSelected
    })
    .await;
}
