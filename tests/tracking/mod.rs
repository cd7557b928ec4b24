//! Helpers for the tracker's integration tests: a tracker served on loopback (for good, or
//! until stopped), a tracker of a kubeconfig directory, a replica fed from a stream until a
//! condition holds or following a tracker in the background, and questions to a replica.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use weft::model::ClusterId;
use weft::policy::{Connection, Endpoint, Engine, PodId};
use weft::tracker::client::{self, Target};
use weft::tracker::replica::Replica;
use weft::tracker::server::Tracker;
use weft::tracker::source::kubernetes::watch_kubeconfigs;
use weft::tracker::view::View;
use weft::tracker::wire::pb;

/// Serves `tracker` in plaintext on `addr` until `shutdown` resolves; returns where, and the
/// serving task.
async fn spawn_serving(
    tracker: &Tracker,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> (Target, SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tracker = tracker.clone();
    let task = tokio::spawn(async move {
        tracker
            .serve(listener, None, shutdown)
            .await
            .expect("serve");
    });
    let target = Target::plaintext(&format!("http://{addr}")).expect("a plaintext target");
    (target, addr, task)
}

/// Serves `tracker` in plaintext on an ephemeral loopback port; returns where.
pub async fn serve(tracker: &Tracker) -> Target {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    spawn_serving(tracker, loopback, std::future::pending())
        .await
        .0
}

/// A tracker served until [`Served::stop`] (or until dropped).
pub struct Served {
    /// Where it is served.
    pub target: Target,
    /// Its address, for a successor on the same port.
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    /// Stops serving and waits until the tracker has: its streams ended, its port free.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("serve task");
    }
}

/// Serves `tracker` in plaintext on `addr` (port 0: an ephemeral port of it) until stopped.
pub async fn serve_on(tracker: &Tracker, addr: SocketAddr) -> Served {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async {
        let _ = stopped.await;
    };
    let (target, addr, task) = spawn_serving(tracker, addr, shutdown).await;
    Served {
        target,
        addr,
        stop,
        task,
    }
}

/// A tracker (a fresh epoch) of the kubeconfig files of `dir`, `names` mapping contexts to
/// cluster ids, with a 50 ms debounce of file events and `max_staleness`.
pub fn kube_tracker(dir: &Path, names: &[(&str, &str)], max_staleness: Duration) -> Tracker {
    kube_tracker_with(Some(dir), None, names, max_staleness)
}

/// [`kube_tracker`] of `dir`, if any, and of the in-cluster kubeconfig `in_cluster`, if any.
pub fn kube_tracker_with(
    dir: Option<&Path>,
    in_cluster: Option<kube::config::Kubeconfig>,
    names: &[(&str, &str)],
    max_staleness: Duration,
) -> Tracker {
    let names: BTreeMap<String, ClusterId> = names
        .iter()
        .map(|(ctx, id)| ((*ctx).to_owned(), ClusterId::new(id).expect("id")))
        .collect();
    let tracker = Tracker::new(View::new(uuid::Uuid::new_v4().to_string(), 10_000), 1 << 20);
    tokio::spawn(watch_kubeconfigs(
        dir.map(Path::to_path_buf),
        in_cluster,
        names,
        tracker.clone(),
        Duration::from_millis(50),
        max_staleness,
    ));
    tracker
}

/// A replica of every cluster (all clusters' policies) following the tracker at `target` in
/// the background, reconnecting after 50 ms.
pub fn subscriber(target: Target) -> Arc<RwLock<Replica>> {
    let replica = Arc::new(RwLock::new(Replica::new()));
    tokio::spawn(client::follow(
        target,
        pb::SubscribeRequest {
            policy_scope: pb::PolicyScope::AllClusters.into(),
            ..Default::default()
        },
        replica.clone(),
        Duration::from_millis(50),
    ));
    replica
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

/// Whether `replica` holds the pod `cluster/namespace/name`.
pub fn has_pod(replica: &Replica, cluster: &str, namespace: &str, name: &str) -> bool {
    replica
        .engine()
        .pod_by_name(cluster, namespace, name)
        .is_some()
}

/// The pod the address `ip` resolves to, as `cluster/namespace/name`: none for an address
/// no live pod owns or several do.
pub fn pod_at(replica: &Replica, ip: &str) -> Option<String> {
    let e = replica.engine();
    match e.address_endpoint(ip.parse().expect("ip")) {
        Endpoint::Pod { pod, .. } => Some(e.pod_name(pod)),
        _ => None,
    }
}

/// A TCP connection to port 80 between two addresses, each resolved as `e` resolves it.
pub fn connection(e: &Engine, from: &str, to: &str) -> Connection {
    let at = |ip: &str| e.address_endpoint(ip.parse().expect("ip"));
    Connection {
        src: at(from),
        dst: at(to),
        port: 80,
        protocol: weft::model::Protocol::Tcp,
    }
}

/// The pod named `cluster/namespace/name` in `replica`.
pub fn pod_named(replica: &Replica, name: &str) -> Option<PodId> {
    let mut parts = name.splitn(3, '/');
    let (cluster, namespace, name) = (parts.next()?, parts.next()?, parts.next()?);
    replica.engine().pod_by_name(cluster, namespace, name)
}

/// The verdict for port 80 between two pods named `cluster/namespace/name`.
pub fn verdict(replica: &Replica, from: &str, to: &str) -> weft::policy::Verdict {
    let e = replica.engine();
    let pod = |name: &str| {
        let id = pod_named(replica, name).expect("pod");
        e.pod_endpoint(id, false).expect("endpoint")
    };
    let conn = Connection {
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

/// Sends `request` (a method and a path) to `addr`; returns the status code and the body.
pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("an answer in time")
        .expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Serves `ca` over TLS with `identity` on an ephemeral loopback port; returns its URL.
pub async fn serve_ca(ca: weft::ca::Ca, serving: weft::tracker::tls::ServingFiles) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().expect("addr").port()
    );
    tokio::spawn(async move {
        ca.serve(listener, serving, std::future::pending())
            .await
            .expect("serve");
    });
    url
}
