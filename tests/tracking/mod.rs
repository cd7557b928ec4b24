//! Helpers for the tracker's integration tests: a tracker served on loopback, and a replica
//! fed from a stream until a condition holds.
#![allow(dead_code)]

use std::time::Duration;

use weft::tracker::client::Target;
use weft::tracker::replica::Replica;
use weft::tracker::server::Tracker;
use weft::tracker::wire::pb;

/// Serves `tracker` in plaintext on an ephemeral loopback port; returns where.
pub async fn serve(tracker: &Tracker) -> Target {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tracker = tracker.clone();
    tokio::spawn(async move {
        tracker
            .serve(listener, None, std::future::pending())
            .await
            .expect("serve");
    });
    Target::plaintext(&format!("http://{addr}")).expect("a plaintext target")
}

/// A request for the whole view, every cluster's policies included.
pub fn all_clusters() -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        policy_scope: pb::PolicyScope::AllClusters.into(),
        ..Default::default()
    }
}

/// Subscribes to the whole view at `target`.
pub async fn subscribe_all(target: &Target) -> tonic::Streaming<pb::Update> {
    weft::tracker::client::subscribe(target, all_clusters())
        .await
        .expect("subscribe")
}

/// Subscribes to the whole view at `target` and reads it into a replica until it is ready.
pub async fn synced(target: &Target) -> (tonic::Streaming<pb::Update>, Replica) {
    let mut stream = subscribe_all(target).await;
    let mut replica = Replica::new();
    until(&mut stream, &mut replica, "a ready replica", Replica::ready).await;
    (stream, replica)
}

/// Reads updates into `replica` until `done` holds of it, for at most 20 s.
pub async fn until(
    stream: &mut tonic::Streaming<pb::Update>,
    replica: &mut Replica,
    what: &str,
    done: impl Fn(&Replica) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done(replica) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let update = tokio::time::timeout(left, stream.message())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("stream ok")
            .expect("an update");
        replica.apply(update).expect("applies");
    }
}

/// The status of `cluster` in `replica`.
pub fn status<'a>(replica: &'a Replica, cluster: &str) -> Option<&'a pb::ClusterStatus> {
    replica.clusters().find(|s| s.cluster == cluster)
}

/// The verdict for port 80 between two pods named `cluster/namespace/name`.
pub fn verdict(replica: &Replica, from: &str, to: &str) -> weft::policy::Verdict {
    let e = replica.engine();
    let pod = |name: &str| {
        let mut parts = name.split('/');
        let (c, ns, n) = (parts.next(), parts.next(), parts.next());
        let id = e
            .pod_by_name(c.unwrap_or(""), ns.unwrap_or(""), n.unwrap_or(""))
            .expect("pod");
        e.pod_endpoint(id, false).expect("endpoint")
    };
    let conn = weft::policy::Connection {
        src: pod(from),
        dst: pod(to),
        port: 80,
        protocol: weft::model::Protocol::Tcp,
    };
    e.decide(&conn).verdict()
}

/// Waits until `done` holds of a followed replica, for at most 20 s.
pub async fn wait_for(
    replica: &std::sync::RwLock<Replica>,
    what: &str,
    done: impl Fn(&Replica) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if done(&replica.read().expect("lock")) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
