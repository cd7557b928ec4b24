//! Workload certificates from a real `weft ca` through the node's identity manager, used in
//! real TLS 1.3 with the SPIFFE verifiers: certificates of seconds renewed under load with no
//! failed connection, and a cluster's root rotated A → A+B → B across two clusters with no
//! failed connection, after which certificates from A no longer verify.

mod pki;
mod tracking;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft::ca::client::{self as ca_client, RemoteCa, Token};
use weft::ca::{Authorizer, BootstrapTokens, Ca, Signer, TtlLimits};
use weft::identity::manager::{Authority, AuthorityFuture, IdentityManager, Renewal};
use weft::identity::verify::PeerSide;
use weft::identity::{BundleSet, Expected, TrustBundle, TrustStore, WorkloadId};
use weft::model::{ClusterId, Pod};
use weft::tracker::client;
use weft::tracker::replica::Replica;
use weft::tracker::server::Tracker;
use weft::tracker::tls::ServingFiles;
use weft::tracker::view::{Change, View};
use weft::tracker::wire::{Object, pb};

const TOKEN: &str = "token-of-the-node-0123456789";

fn cid(s: &str) -> ClusterId {
    ClusterId::new(s).expect("cluster id")
}

/// A Running pod of namespace demo with service account `sa` on `node`.
fn pod(cluster: &str, name: &str, node: &str, sa: &str) -> Object {
    Object::Pod(
        Pod::from_api(
            &cid(cluster),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "demo", "uid": format!("{cluster}-{name}")},
                "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
                "status": {"phase": "Running"}}))
            .expect("pod"),
        )
        .expect("valid"),
    )
}

fn id(cluster: &str, sa: &str) -> WorkloadId {
    WorkloadId::parse(&format!("spiffe://{cluster}/ns/demo/sa/{sa}")).expect("id")
}

/// A tracker with pods `web` (cluster-1, node-1) and `api` (cluster-2, node-2), both synced.
async fn tracker() -> client::Target {
    let tracker = Tracker::new(View::new("e", 100), 1 << 20);
    tracker.apply(Change {
        upserts: vec![
            pod("cluster-1", "web-0", "node-1", "web"),
            pod("cluster-2", "api-0", "node-2", "api"),
        ],
        clusters: ["cluster-1", "cluster-2"]
            .map(|c| pb::ClusterStatus {
                cluster: c.into(),
                synced: true,
                connected: true,
                ..Default::default()
            })
            .to_vec(),
        ..Change::default()
    });
    tracking::serve(&tracker).await
}

/// The CA `name` of `cluster` signing with `root`'s key (certificates of 1 to 2 s), following the
/// tracker at `view_of`; the node's client for it, with `node`'s token.
async fn ca(
    dir: &std::path::Path,
    name: &str,
    root: &pki::Pki,
    cluster: &str,
    node: &str,
    view_of: &client::Target,
) -> RemoteCa {
    let view = Arc::new(RwLock::new(Replica::new()));
    tokio::spawn(client::follow(
        view_of.clone(),
        pb::SubscribeRequest {
            cluster: cluster.into(),
            ..Default::default()
        },
        view.clone(),
        Duration::from_millis(50),
    ));
    tracking::wait_for(&view, "the CA's view", Replica::ready).await;
    let tokens = dir.join(format!("{name}-tokens"));
    std::fs::write(&tokens, format!("{TOKEN} {node}\n")).expect("write");
    let td = weft::identity::trust_domain_for(&cid(cluster), None).expect("td");
    let limits =
        TtlLimits::new(Duration::from_secs(1), Duration::from_secs(2)).expect("ttl limits");
    let signer =
        Signer::load(&root.ca_file(), &root.ca_key_file(), None, &td, limits).expect("signer");
    let serving = root.issue(&format!("{name}-serving"), "spiffe://x/weft/ca");
    let identity = ServingFiles::load(&serving.cert, &serving.key).expect("serving identity");
    let ca = Ca::new(
        signer,
        Arc::new(BootstrapTokens::load(&tokens).expect("tokens")),
        Authorizer::new(cid(cluster), td, view),
    );
    let url = tracking::serve_ca(ca, identity).await;
    let channel = ca_client::connect(
        &url,
        tonic::transport::Certificate::from_pem(std::fs::read(root.ca_file()).expect("root")),
    )
    .await
    .expect("connect");
    RemoteCa::new(channel, Token::Fixed(TOKEN.into()))
}

/// An authority that can be switched to another CA, as a re-keyed CA is.
struct Switchable(Mutex<Arc<RemoteCa>>);

impl Authority for Switchable {
    fn sign<'a>(
        &'a self,
        csr: Vec<u8>,
        identity: &'a WorkloadId,
        ttl: Duration,
    ) -> AuthorityFuture<'a> {
        let current = self.0.lock().expect("lock").clone();
        Box::pin(async move { current.sign(csr, identity, ttl).await })
    }
}

fn manager(authority: Arc<dyn Authority>, identity: &WorkloadId) -> Arc<IdentityManager> {
    let manager = IdentityManager::new(
        authority,
        Renewal {
            ttl: Duration::from_secs(2),
            retry: Duration::from_millis(50),
            retry_cap: Duration::from_millis(200),
            first_retry_cap: Duration::from_millis(200),
        },
    );
    manager.set_identities(&[identity.clone()].into());
    Arc::new(manager)
}

fn bundles(roots: &[(&str, &[&pki::Pki])]) -> BundleSet {
    BundleSet::new(roots.iter().map(|(td, pkis)| {
        let pem: Vec<u8> = pkis
            .iter()
            .flat_map(|p| std::fs::read(p.ca_file()).expect("root"))
            .collect();
        TrustBundle::from_pem(weft::identity::id::trust_domain(td).expect("td"), &pem)
            .expect("bundle")
    }))
    .expect("bundle set")
}

/// A TLS echo server presenting `id`'s certificates from `server` and verifying clients by
/// `trust`; returns its address. `guarded`, a connection closes once its client is no longer
/// trusted or `id` is dropped from `server`.
async fn echo_server(
    trust: &TrustStore,
    server: &Arc<IdentityManager>,
    id: &WorkloadId,
    guarded: bool,
) -> String {
    let config = trust
        .server_config(server.resolver(id))
        .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (trust, server, id) = (trust.clone(), server.clone(), id.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, trust, server, id) =
                (acceptor.clone(), trust.clone(), server.clone(), id.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let chain = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .unwrap_or_default()
                    .to_vec();
                let echo = async {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                if guarded {
                    tokio::select! {
                        () = echo => {}
                        _ = trust.until_distrusted(chain, PeerSide::Client) => {}
                        () = server.until_dropped(&id) => {}
                    }
                } else {
                    echo.await;
                }
            });
        }
    });
    addr
}

/// One ping over a new connection, or over `held`.
async fn ping(stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> bool {
    let mut buf = [0u8; 4];
    stream.write_all(b"ping").await.is_ok()
        && stream.read_exact(&mut buf).await.is_ok()
        && &buf == b"ping"
}

async fn connect(
    connector: &TlsConnector,
    addr: &str,
) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls_pki_types::ServerName::try_from("spiffe.invalid").ok()?;
    connector.connect(name, tcp).await.ok()
}

/// Until stopped: new connections every 20 ms and pings every 20 ms on four held ones;
/// counts successes and failures.
fn load(
    connector: TlsConnector,
    addr: String,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..4 {
            match connect(&connector, &addr).await {
                Some(s) => held.push(s),
                None => {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        loop {
            let fresh = match connect(&connector, &addr).await {
                Some(mut s) => ping(&mut s).await,
                None => false,
            };
            let mut all = fresh;
            for s in &mut held {
                all &= ping(s).await;
            }
            if all {
                ok.fetch_add(1, Ordering::SeqCst);
            } else {
                failed.fetch_add(1, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

async fn certified(manager: &IdentityManager, id: &WorkloadId) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while manager.certificate(id).is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no certificate for {id}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_seconds_renew_under_load_with_no_failed_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = pki::Pki::new(dir.path(), "c1");
    let view = tracker().await;
    let ca = Arc::new(ca(dir.path(), "ca", &root, "cluster-1", "node-1", &view).await);
    let web = id("cluster-1", "web");
    let node = manager(ca, &web);
    certified(&node, &web).await;
    let trust = TrustStore::new(bundles(&[("cluster-1", &[&root])])).expect("trust");
    // One workload talking to itself: client and server certificates both rotate.
    let addr = echo_server(&trust, &node, &web, false).await;
    let connector = TlsConnector::from(Arc::new(
        trust
            .client_config(Expected::Workload(web.clone()), node.resolver(&web))
            .expect("client config"),
    ));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let running = load(connector, addr, ok.clone(), failed.clone());
    let first = node.certificate(&web).expect("certificate");
    tokio::time::sleep(Duration::from_secs(4)).await;
    running.abort();
    let status = &node.status()[0];
    assert!(status.renewals >= 3, "{status:?}");
    assert_ne!(
        node.certificate(&web).expect("certificate").cert,
        first.cert
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no failed connection");
    assert!(
        ok.load(Ordering::SeqCst) > 50,
        "{} rounds",
        ok.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotated_across_two_clusters_drops_no_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, c) = (
        pki::Pki::new(dir.path(), "a"),
        pki::Pki::new(dir.path(), "b"),
        pki::Pki::new(dir.path(), "c"),
    );
    let view = tracker().await;
    let (web, api) = (id("cluster-1", "web"), id("cluster-2", "api"));
    let ca1_a = Arc::new(ca(dir.path(), "ca1-a", &a, "cluster-1", "node-1", &view).await);
    let ca1_b = Arc::new(ca(dir.path(), "ca1-b", &b, "cluster-1", "node-1", &view).await);
    let ca2 = Arc::new(ca(dir.path(), "ca2", &c, "cluster-2", "node-2", &view).await);
    let authority1 = Arc::new(Switchable(Mutex::new(ca1_a)));
    let node1 = manager(authority1.clone(), &web);
    let node2 = manager(ca2, &api);
    certified(&node1, &web).await;
    certified(&node2, &api).await;

    // Every node trusts cluster-1's root A and cluster-2's root C.
    let trust1 =
        TrustStore::new(bundles(&[("cluster-1", &[&a]), ("cluster-2", &[&c])])).expect("trust");
    let trust2 =
        TrustStore::new(bundles(&[("cluster-1", &[&a]), ("cluster-2", &[&c])])).expect("trust");
    let addr = echo_server(&trust2, &node2, &api, false).await;
    let connector = TlsConnector::from(Arc::new(
        trust1
            .client_config(Expected::Workload(api.clone()), node1.resolver(&web))
            .expect("client config"),
    ));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let running = load(connector.clone(), addr.clone(), ok.clone(), failed.clone());
    let signed_by_a = node1.certificate(&web).expect("certificate");

    // A+B everywhere; then cluster-1's CA signs with B; once every certificate of cluster-1
    // is from B, B alone.
    for store in [&trust1, &trust2] {
        store
            .replace(bundles(&[("cluster-1", &[&a, &b]), ("cluster-2", &[&c])]))
            .expect("A+B");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    *authority1.0.lock().expect("lock") = ca1_b;
    let renewals = node1.status()[0].renewals;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while node1.status()[0].renewals < renewals + 1 {
        assert!(tokio::time::Instant::now() < deadline, "no renewal from B");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for store in [&trust1, &trust2] {
        store
            .replace(bundles(&[("cluster-1", &[&b]), ("cluster-2", &[&c])]))
            .expect("B");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.abort();
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no failed connection");
    assert!(
        ok.load(Ordering::SeqCst) > 20,
        "{} rounds",
        ok.load(Ordering::SeqCst)
    );

    // A certificate from A, presented now, is refused.
    let stale = TlsConnector::from(Arc::new(
        trust1
            .client_config(
                Expected::Workload(api.clone()),
                Arc::new(Fixed(signed_by_a)),
            )
            .expect("client config"),
    ));
    let refused = match connect(&stale, &addr).await {
        Some(mut s) => !ping(&mut s).await,
        None => true,
    };
    assert!(refused, "a certificate from root A after A was dropped");
}

/// Always presents one certificate.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_close_when_their_peer_is_revoked_or_their_identity_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, c) = (
        pki::Pki::new(dir.path(), "a"),
        pki::Pki::new(dir.path(), "b"),
        pki::Pki::new(dir.path(), "c"),
    );
    let view = tracker().await;
    let (web, api) = (id("cluster-1", "web"), id("cluster-2", "api"));
    let node1 = manager(
        Arc::new(ca(dir.path(), "ca1", &a, "cluster-1", "node-1", &view).await),
        &web,
    );
    let node2 = manager(
        Arc::new(ca(dir.path(), "ca2", &c, "cluster-2", "node-2", &view).await),
        &api,
    );
    certified(&node1, &web).await;
    certified(&node2, &api).await;
    let both = || bundles(&[("cluster-1", &[&a]), ("cluster-2", &[&c])]);
    let (trust1, trust2) = (
        TrustStore::new(both()).expect("trust"),
        TrustStore::new(both()).expect("trust"),
    );
    let addr = echo_server(&trust2, &node2, &api, true).await;
    let connector = TlsConnector::from(Arc::new(
        trust1
            .client_config(Expected::Workload(api.clone()), node1.resolver(&web))
            .expect("client config"),
    ));

    // Cluster-1's root is revoked at cluster-2: the open connection from cluster-1 closes,
    // and no new one opens.
    let mut held = connect(&connector, &addr).await.expect("connect");
    assert!(ping(&mut held).await);
    trust2
        .replace(bundles(&[("cluster-1", &[&b]), ("cluster-2", &[&c])]))
        .expect("replace");
    let took = closed_within(held).await;
    assert!(took < Duration::from_secs(1), "{took:?}");
    let refused = match connect(&connector, &addr).await {
        Some(mut s) => !ping(&mut s).await,
        None => true,
    };
    assert!(refused, "a new connection from a revoked root");

    // Trusted again; then the server's own identity is dropped (its pod left): its open
    // connections close.
    trust2.replace(both()).expect("replace");
    let mut held = connect(&connector, &addr).await.expect("connect");
    assert!(ping(&mut held).await);
    node2.set_identities(&Default::default());
    let took = closed_within(held).await;
    assert!(took < Duration::from_secs(1), "{took:?}");
}

/// Pings `held` until it fails; how long that took (at most 2 s).
async fn closed_within(
    mut held: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> Duration {
    let start = tokio::time::Instant::now();
    while ping(&mut held).await {
        assert!(start.elapsed() < Duration::from_secs(2), "still open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn bundles_followed_in_a_directory_replace_those_in_force_and_bad_ones_do_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundles = dir.path().join("bundles");
    std::fs::create_dir(&bundles).expect("mkdir");
    let (r1, r2) = (
        pki::Pki::new(dir.path(), "r1"),
        pki::Pki::new(dir.path(), "r2"),
    );
    let file = bundles.join("cluster-1.pem");
    std::fs::copy(r1.ca_file(), &file).expect("copy");
    let trust = TrustStore::new(BundleSet::load_dir(&bundles).expect("load")).expect("trust");
    let followed = trust.clone();
    let watching = bundles.clone();
    let task = tokio::spawn(async move {
        followed
            .follow_dir(watching, Duration::from_millis(20))
            .await
    });
    let roots = |t: &TrustStore| -> Vec<Vec<u8>> {
        t.bundles()
            .iter()
            .flat_map(|b| b.authorities().map(|a| a.to_vec()).collect::<Vec<_>>())
            .collect()
    };
    let before = roots(&trust);
    // Rotated: r2 in, r1 out.
    std::fs::copy(r2.ca_file(), &file).expect("copy");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while roots(&trust) == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated root is not in force"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rotated = roots(&trust);
    // A file that does not load keeps what is in force.
    std::fs::write(&file, "not a certificate").expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(roots(&trust), rotated, "a bad directory replaced nothing");
    task.abort();
}
