//! The tracker's stream over mutual TLS: who a subscriber is comes from its client
//! certificate (a SPIFFE id), never from its request; a node agent gets its own cluster's
//! policies only and may not subscribe as another node or cluster (the certificate of every
//! agent of a cluster: as any of its nodes); certificates from another
//! CA, none at all, or an identity that is no weft subscriber are refused; renewed files are
//! used by each new connection, on both sides; and `weft policy check --tracker https://…`
//! answers as the offline check.

mod pki;

use std::path::Path;
use std::time::Duration;

use pki::{Issued, Pki};
use tonic::Code;
use weft::tracker::client::{self, Target};
use weft::tracker::server::Tracker;
use weft::tracker::source::ClustersetSource;
use weft::tracker::tls::TlsFiles;
use weft::tracker::view::View;
use weft::tracker::wire::pb;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/two-cluster");
const TD: &str = "spiffe://mesh.weft";

fn tls(issued: &Issued) -> TlsFiles {
    TlsFiles::load(&issued.cert, &issued.key, &issued.ca).expect("tls files")
}

/// A tracker of the example's third step served with mutual TLS; its URL.
async fn serve_tls(pki: &Pki) -> String {
    serve_tls_with(tls(
        &pki.issue("tracker", &format!("{TD}/weft/cluster/cluster-1/tracker"))
    ))
    .await
}

/// [`serve_tls`] with the tracker's TLS files `server`.
async fn serve_tls_with(server: TlsFiles) -> String {
    let mut source = ClustersetSource::new(Path::new(EXAMPLE).join("3-allow-from-cluster-1"));
    let tracker = Tracker::new(View::new("epoch-1", 100), 1 << 20);
    tracker.apply(source.rescan().expect("example loads"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().expect("addr").port()
    );
    tokio::spawn(async move {
        tracker
            .serve(listener, Some(&server), std::future::pending())
            .await
            .expect("serve");
    });
    url
}

fn request(node: &str, cluster: &str, scope: pb::PolicyScope) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        node: node.into(),
        cluster: cluster.into(),
        policy_scope: scope.into(),
        resume: None,
    }
}

/// The clusters of the policies in the snapshot that `request` gets, or the refusal.
async fn policies_seen(
    target: &Target,
    request: pb::SubscribeRequest,
) -> Result<Vec<String>, tonic::Status> {
    let mut stream = match client::subscribe(target, request).await {
        Ok(stream) => stream,
        Err(client::ClientError::Status { status, .. }) => return Err(status),
        Err(e) => panic!("not a refusal: {e}"),
    };
    let mut clusters = Vec::new();
    loop {
        let update = stream.message().await?.expect("an update");
        let Some(pb::update::Change::Snapshot(part)) = update.change else {
            panic!("a snapshot first");
        };
        for o in &part.objects {
            if let Some(pb::object::Object::NetworkPolicy(p)) = &o.object {
                clusters.push(p.cluster.clone());
            }
        }
        if part.last {
            return Ok(clusters);
        }
    }
}

#[tokio::test]
async fn a_node_is_who_its_certificate_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "mesh");
    let url = serve_tls(&pki).await;
    use pb::PolicyScope::{AllClusters, OwnCluster};

    // A subscriber whose certificate carries `{TD}{path}`.
    let subscriber = |name: &str, path: &str| {
        let issued = pki.issue(name, &format!("{TD}{path}"));
        Target::new(&url, Some(tls(&issued))).expect("target")
    };
    let node = |cluster: &str, node: &str| {
        subscriber(
            &format!("{cluster}-{node}"),
            &format!("/weft/cluster/{cluster}/node/{node}"),
        )
    };
    // Admitted, with cluster-2's policies and no other's.
    let cluster_2_only = async |target: &Target, request| {
        let seen = policies_seen(target, request).await.expect("admitted");
        assert!(
            !seen.is_empty() && seen.iter().all(|c| c == "cluster-2"),
            "{seen:?}"
        );
    };
    let c2 = node("cluster-2", "node-a");
    // Its own cluster's policies, whatever it leaves unsaid.
    cluster_2_only(&c2, request("", "", OwnCluster)).await;
    let seen = policies_seen(&node("cluster-1", "node-a"), request("", "", OwnCluster))
        .await
        .expect("admitted");
    assert!(seen.is_empty(), "cluster-1 has no policy: {seen:?}");

    // Claiming another node or cluster, or every cluster's policies, is refused.
    let e = policies_seen(&c2, request("node-b", "cluster-2", OwnCluster))
        .await
        .expect_err("another node");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "node node-a of cluster cluster-2 may not subscribe as node \"node-b\""
    );
    let e = policies_seen(&c2, request("node-a", "cluster-1", OwnCluster))
        .await
        .expect_err("another cluster");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("as cluster \"cluster-1\""), "{e}");
    let e = policies_seen(&c2, request("", "", AllClusters))
        .await
        .expect_err("all clusters");
    assert_eq!(e.code(), Code::PermissionDenied);

    // The certificate of every agent of a cluster (one Secret a DaemonSet mounts): any node
    // of that cluster, its policies only.
    let agents = subscriber("agents", "/weft/cluster/cluster-2/nodes");
    for node in ["node-a", "node-b"] {
        cluster_2_only(&agents, request(node, "cluster-2", OwnCluster)).await;
    }
    let e = policies_seen(&agents, request("node-a", "cluster-1", OwnCluster))
        .await
        .expect_err("another cluster");
    assert_eq!(
        e.message(),
        "a node agent of cluster cluster-2 may not subscribe as cluster \"cluster-1\""
    );
    let e = policies_seen(&agents, request("node-a", "", AllClusters))
        .await
        .expect_err("all clusters");
    assert_eq!(e.code(), Code::PermissionDenied);

    // The cluster's CA: its own cluster's view, as no node.
    let ca = subscriber("ca", "/weft/cluster/cluster-2/ca");
    cluster_2_only(&ca, request("", "cluster-2", OwnCluster)).await;
    let e = policies_seen(&ca, request("node-a", "cluster-2", OwnCluster))
        .await
        .expect_err("a CA is no node");
    assert_eq!(
        e.message(),
        "the CA of cluster cluster-2 may not subscribe as node \"node-a\""
    );

    // An admin's tool gets every cluster's policies and syncs as the offline check would.
    let admin = subscriber("admin", "/weft/admin/alice");
    let replica = client::sync(
        &admin,
        request("", "", AllClusters),
        Duration::from_secs(10),
    )
    .await
    .expect("synced");
    assert!(replica.ready());

    // A workload's identity is no subscriber.
    let workload = Target::new(
        &url,
        Some(tls(&pki.issue("web", &format!("{TD}/ns/demo/sa/web")))),
    )
    .expect("target");
    let e = policies_seen(&workload, request("", "cluster-1", OwnCluster))
        .await
        .expect_err("a workload");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("not a weft subscriber"), "{e}");
}

#[tokio::test]
async fn a_tracker_reached_by_address_is_checked_for_the_name_it_is_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "mesh");
    let url = serve_tls(&pki).await;
    let agents = tls(&pki.issue("agents", &format!("{TD}/weft/cluster/cluster-2/nodes")));
    let request = || request("node-a", "cluster-2", pb::PolicyScope::OwnCluster);
    // The tracker's certificate names localhost (and 127.0.0.1, which the URL has).
    let named = |name: &str| {
        Target::new(&url, Some(agents.clone()))
            .expect("target")
            .with_server_name(name)
            .expect("a name")
    };
    policies_seen(&named("localhost"), request())
        .await
        .expect("the name the certificate carries");
    match client::subscribe(&named("weft-tracker.weft-system.svc"), request()).await {
        Err(client::ClientError::Connect { .. }) => {}
        other => panic!(
            "a certificate without the name is refused: {:?}",
            other.err()
        ),
    }
    for bad in ["", "a b", "-.example"] {
        let e = Target::new(&url, Some(agents.clone()))
            .expect("target")
            .with_server_name(bad)
            .expect_err(bad);
        assert!(
            e.to_string().contains(&format!("server name {bad:?}")),
            "{e}"
        );
    }
    let e = Target::new("http://127.0.0.1:1", None)
        .expect("target")
        .with_server_name("localhost")
        .expect_err("plaintext");
    assert!(e.to_string().contains("plaintext"), "{e}");
}

#[tokio::test]
async fn certificates_from_another_ca_or_none_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "mesh");
    let url = serve_tls(&pki).await;
    let request = || request("", "", pb::PolicyScope::AllClusters);

    // A client certificate from another CA (that client trusts the tracker's CA).
    let rogue = Pki::new(dir.path(), "rogue");
    let mut issued = rogue.issue("rogue-admin", &format!("{TD}/weft/admin/mallory"));
    issued.ca = pki.ca_file();
    let e = client::sync(
        &Target::new(&url, Some(tls(&issued))).expect("target"),
        request(),
        Duration::from_secs(5),
    )
    .await
    .expect_err("another CA");
    assert!(
        matches!(
            e,
            client::ClientError::Status { .. } | client::ClientError::Connect { .. }
        ),
        "{e}"
    );

    // A client that trusts only another CA does not accept the tracker.
    let mut distrustful = pki.issue("admin", &format!("{TD}/weft/admin/alice"));
    distrustful.ca = rogue.ca_file();
    let e = client::sync(
        &Target::new(&url, Some(tls(&distrustful))).expect("target"),
        request(),
        Duration::from_secs(5),
    )
    .await
    .expect_err("an untrusted server");
    assert!(e.to_string().contains(&url), "{e}");

    // No client certificate at all.
    let ca = std::fs::read(pki.ca_file()).expect("ca");
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .expect("url")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        )
        .expect("tls")
        .connect()
        .await;
    if let Ok(channel) = channel {
        let refused = pb::tracker_client::TrackerClient::new(channel)
            .subscribe(request())
            .await;
        assert!(refused.is_err(), "a subscriber without a certificate");
    }

    // The tracker still serves who it should.
    let admin = Target::new(
        &url,
        Some(tls(&pki.issue("admin", &format!("{TD}/weft/admin/alice")))),
    )
    .expect("target");
    client::sync(&admin, request(), Duration::from_secs(10))
        .await
        .expect("synced");
}

fn weft(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(args)
        .output()
        .expect("run weft")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_check_over_https_answers_as_the_offline_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "mesh");
    let url = serve_tls(&pki).await;
    let admin = pki.issue("admin", &format!("{TD}/weft/admin/alice"));
    let probes = format!("{EXAMPLE}/probes.yaml");
    let offline = format!("{EXAMPLE}/3-allow-from-cluster-1");
    let (cert, key, ca) = (
        admin.cert.display().to_string(),
        admin.key.display().to_string(),
        admin.ca.display().to_string(),
    );
    let (over_tls, direct, no_files, plain_with_files) = tokio::task::spawn_blocking(move || {
        let tls = ["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &ca];
        let mut args = vec!["policy", "check", "--tracker", &url, "--probes", &probes];
        args.extend(tls);
        let over_tls = weft(&args);
        let direct = weft(&[
            "policy",
            "check",
            "--clusters",
            &offline,
            "--probes",
            &probes,
        ]);
        let no_files = weft(&["policy", "check", "--tracker", &url, "--probes", &probes]);
        let plain = url.replace("https://", "http://");
        let mut args = vec!["policy", "check", "--tracker", &plain, "--probes", &probes];
        args.extend(tls);
        (over_tls, direct, no_files, weft(&args))
    })
    .await
    .expect("join");
    assert!(
        over_tls.status.success(),
        "{}",
        String::from_utf8_lossy(&over_tls.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&over_tls.stdout),
        String::from_utf8_lossy(&direct.stdout)
    );
    assert!(!no_files.status.success());
    let stderr = String::from_utf8_lossy(&no_files.stderr);
    assert!(stderr.contains("--tls-cert"), "{stderr}");
    assert!(!plain_with_files.status.success());
    let stderr = String::from_utf8_lossy(&plain_with_files.stderr);
    assert!(stderr.contains("use https://"), "{stderr}");
}

#[test]
fn the_tracker_needs_tls_files_or_an_explicit_insecure() {
    let out = weft(&["tracker", "--clusters", EXAMPLE, "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--tls-cert") && stderr.contains("--insecure"),
        "{stderr}"
    );
    let out = weft(&[
        "tracker",
        "--clusters",
        EXAMPLE,
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
        "--tls-ca",
        "/nonexistent/ca.pem",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--tls-cert /nonexistent/cert.pem"),
        "{stderr}"
    );
}

/// Renewed certificates are used without a restart (a Secret is rewritten in place): the
/// tracker presents what its files hold to each new connection, and a subscriber presents
/// what its files hold at each connection; files that change into something unusable leave
/// the last good ones in use.
#[tokio::test]
async fn renewed_files_are_used_by_each_new_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "mesh");
    let rogue = Pki::new(dir.path(), "rogue");
    let served = pki.issue("tracker", &format!("{TD}/weft/cluster/cluster-1/tracker"));
    let url = serve_tls_with(tls(&served)).await;
    let client = pki.issue("admin", &format!("{TD}/weft/admin/alice"));
    let admin = Target::new(&url, Some(tls(&client))).expect("target");
    let sync = || {
        client::sync(
            &admin,
            request("", "", pb::PolicyScope::AllClusters),
            Duration::from_secs(5),
        )
    };
    // Renewing: the certificate and its key replaced, as the kubelet swaps a Secret's files.
    let renew = |files: &Issued, with: &Issued| {
        for (from, to) in [(&with.cert, &files.cert), (&with.key, &files.key)] {
            std::fs::copy(from, to).expect("renewed");
        }
    };
    sync().await.expect("synced");

    // The tracker's files now hold a certificate of a CA the subscriber does not trust: a
    // new connection gets it.
    let elsewhere = rogue.issue("elsewhere", &format!("{TD}/weft/cluster/cluster-1/tracker"));
    renew(&served, &elsewhere);
    sync()
        .await
        .expect_err("the tracker's new certificate, from an unknown CA");
    renew(
        &served,
        &pki.issue("renewed", &format!("{TD}/weft/cluster/cluster-1/tracker")),
    );
    sync().await.expect("synced with the renewed certificate");

    // The subscriber's files likewise: its next connection presents the new certificate.
    let mallory = rogue.issue("mallory", &format!("{TD}/weft/admin/alice"));
    let kept = pki.issue("alice-renewed", &format!("{TD}/weft/admin/alice"));
    renew(&client, &mallory);
    sync()
        .await
        .expect_err("the subscriber's new certificate, from an unknown CA");
    renew(&client, &kept);
    sync()
        .await
        .expect("synced with the renewed client certificate");

    // Files that change into what does not load: the last good ones stay in use.
    std::fs::write(&served.cert, "not a certificate\n").expect("broken");
    std::fs::write(&client.key, "not a key\n").expect("broken");
    sync().await.expect("still synced with the last good files");
}

/// Connections that never finish TLS cannot pile up from one source: past
/// `PENDING_HANDSHAKES_PER_SOURCE` under way, a new one is reset at accept, and once they are
/// gone a subscriber from that source is served again.
#[tokio::test]
async fn a_source_s_pending_handshakes_are_capped() {
    use tokio::io::AsyncReadExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "mesh");
    let url = serve_tls(&pki).await;
    let addr = url.trim_start_matches("https://").to_owned();
    let mut stalled = Vec::new();
    for _ in 0..weft::tracker::tls::PENDING_HANDSHAKES_PER_SOURCE {
        stalled.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }
    // One more from the same source: reset at once, not left waiting for its ClientHello.
    let mut over = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), over.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "over the cap, the connection is closed at accept: {read:?}"
    );
    // A stalled one is still open, waiting for its handshake.
    let waiting =
        tokio::time::timeout(Duration::from_millis(300), stalled[0].read(&mut byte)).await;
    assert!(waiting.is_err(), "a pending handshake is kept: {waiting:?}");
    drop(stalled);
    let admin = Target::new(
        &url,
        Some(tls(&pki.issue("admin", &format!("{TD}/weft/admin/alice")))),
    )
    .expect("target");
    let synced = succeeds_soon(|| {
        client::sync(
            &admin,
            request("", "", pb::PolicyScope::AllClusters),
            Duration::from_secs(5),
        )
    })
    .await;
    assert!(synced, "served again once the stalled connections are gone");
}

/// Whether `attempt` succeeds within a few tries a short while apart (a closed connection's
/// slot is given back once its task sees it closed).
async fn succeeds_soon<F, Fut, T, E>(attempt: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    for _ in 0..20 {
        if attempt().await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
