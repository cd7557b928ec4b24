//! A node's HBONE server with the node's own admission, over real SPIFFE mTLS on loopback:
//! a tunnel from a client pod to a local pod is carried when NetworkPolicy and identity rules
//! allow it; a pod of another node gets 400 and nothing is dialled; a source pod that runs as
//! another identity than the peer proved gets 403 (THREATS 2).

#[path = "../src/identity/testpki.rs"]
mod testpki;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use weft::identity::id::trust_domain;
use weft::identity::{BundleSet, Expected, TrustBundle, TrustStore, WorkloadId};
use weft::model::{ClusterId, IdentityPolicy, NetworkPolicy, Pod};
use weft::node::inbound::NodeAdmission;
use weft::proxy::{ClientError, ClientSettings, Pool, PoolKey, Server, ServerSettings};
use weft::tracker::replica::Replica;
use weft::tracker::view::{Change, Scope, View};
use weft::tracker::wire::{Object, pb};

const WEB: &str = "spiffe://cluster-1/ns/demo/sa/web";
const CLIENT: &str = "spiffe://cluster-1/ns/demo/sa/client";

fn c() -> ClusterId {
    ClusterId::new("cluster-1").expect("id")
}

fn id(s: &str) -> WorkloadId {
    WorkloadId::parse(s).expect("id")
}

fn pod(name: &str, node: &str, app: &str, sa: &str, ip: &str) -> Object {
    Object::Pod(
        Pod::from_api(
            &c(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "demo", "uid": name, "labels": {"app": app}},
                "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
                "status": {"phase": "Running", "podIP": ip}}))
            .expect("pod"),
        )
        .expect("valid"),
    )
}

/// The view: `web` on node-a at 127.0.0.1 (where the echo server listens), `client` and
/// `rogue` (app=client, but service account rogue) on node-b; web admits app=client by
/// NetworkPolicy and service account `client` by identity rule.
fn view() -> Arc<RwLock<Replica>> {
    let policy = NetworkPolicy::from_api(
        &c(),
        &serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}}))
        .expect("policy"),
        &mut Vec::new(),
    )
    .expect("valid");
    let identity = IdentityPolicy::from_value(
        &c(),
        serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "IdentityPolicy",
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "rules": [{"from": [{"serviceAccount": "client"}]}]}}),
    )
    .expect("identity policy");
    let mut view = View::new("e", 100);
    view.apply(Change {
        upserts: vec![
            pod("web", "node-a", "web", "web", "127.0.0.1"),
            pod("client", "node-b", "client", "client", "10.0.0.2"),
            pod("rogue", "node-b", "client", "rogue", "10.0.0.4"),
            Object::NetworkPolicy(policy),
            Object::IdentityPolicy(identity),
        ],
        clusters: vec![pb::ClusterStatus {
            cluster: "cluster-1".into(),
            synced: true,
            connected: true,
            ..Default::default()
        }],
        ..Change::default()
    });
    let mut replica = Replica::new();
    for part in view.snapshot(&Scope::AllClusters, 1 << 20) {
        replica.apply(part).expect("part");
    }
    Arc::new(RwLock::new(replica))
}

#[tokio::test]
async fn a_nodes_admission_decides_tunnels_before_any_dial() {
    let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    let dialled = Arc::new(AtomicUsize::new(0));
    let counter = dialled.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = echo.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });

    let root = testpki::Ca::root("cluster-1-root");
    let bundle =
        TrustBundle::new(trust_domain("cluster-1").expect("td"), vec![root.der()]).expect("bundle");
    let trust = TrustStore::new(BundleSet::new([bundle]).expect("set")).expect("trust");
    let admission = NodeAdmission::new(view(), c(), "node-a", trust.clone());
    let tls = trust
        .server_config(root.leaf(WEB).resolver())
        .expect("server config");
    let server = Arc::new(Server::new(
        Arc::new(tls),
        ServerSettings::default(),
        Arc::new(admission),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let node = listener.local_addr().expect("addr");
    tokio::spawn(server.run(listener));

    let pool = Pool::new(ClientSettings::default());
    let key = PoolKey {
        source: id(CLIENT),
        node,
        destination: id(WEB),
        generation: 0,
    };
    let client_tls = Arc::new(
        trust
            .client_config(Expected::Workload(id(WEB)), root.leaf(CLIENT).resolver())
            .expect("client config"),
    );
    let source = |ip: &str| ip.parse::<IpAddr>().expect("ip");

    // Allowed: the client pod, as itself, to the local web pod.
    let mut tunnel = pool
        .connect(&key, client_tls.clone(), echo_addr, source("10.0.0.2"))
        .await
        .expect("admitted");
    tunnel.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&back, b"ping");
    assert_eq!(dialled.load(Ordering::SeqCst), 1);

    let status = |outcome: Result<weft::proxy::Tunnel, ClientError>| match outcome {
        Err(ClientError::Refused { status, .. }) => status.as_u16(),
        Err(e) => panic!("not a refusal: {e}"),
        Ok(_) => panic!("admitted"),
    };
    // The rogue pod is app=client, but the client's certificate does not speak for it.
    let rogue = pool
        .connect(&key, client_tls.clone(), echo_addr, source("10.0.0.4"))
        .await;
    assert_eq!(status(rogue), 403);
    // A pod of another node is no destination here.
    let elsewhere: SocketAddr = format!("10.0.0.2:{}", echo_addr.port())
        .parse()
        .expect("addr");
    let other_node = pool
        .connect(&key, client_tls, elsewhere, source("10.0.0.2"))
        .await;
    assert_eq!(status(other_node), 400);
    assert_eq!(
        dialled.load(Ordering::SeqCst),
        1,
        "nothing dialled for a refusal"
    );
}
