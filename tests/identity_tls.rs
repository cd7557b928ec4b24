//! SPIFFE mutual TLS over loopback with weft's verifiers (TLS 1.3, tokio-rustls): a good pair
//! connects and each side learns the other's proven identity; every bad certificate of
//! THREATS 1, 3–7 fails the handshake whichever side presents it; a server that is not the
//! expected workload is refused; and a trust bundle swapped {R1} → {R1,R2} → {R2} under
//! unchanged TLS configurations accepts and refuses R1 and R2 peers as a root rotation must
//! (THREATS 9), as does federation {a} → {a,b} (THREATS 6).

#[path = "../src/identity/testpki.rs"]
mod testpki;

use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, IsCa, KeyUsagePurpose, OtherNameValue, SanType};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::time_provider::TimeProvider;
use rustls::{ClientConfig, ServerConfig};
use testpki::{Ca, Leaf, at, leaf_params, now_secs, uri, valid};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft::identity::id::trust_domain;
use weft::identity::{BundleSet, Expected, TrustBundle, TrustStore, WorkloadId, peer_identity};

const CLIENT: &str = "spiffe://a.test/ns/demo/sa/client";
const SERVER: &str = "spiffe://a.test/ns/demo/sa/server";

fn id(s: &str) -> WorkloadId {
    WorkloadId::parse(s).expect("workload id")
}

fn set(bundles: &[(&str, &[&Ca])]) -> BundleSet {
    BundleSet::new(bundles.iter().map(|(name, roots)| {
        let td = trust_domain(name).expect("trust domain");
        TrustBundle::new(td, roots.iter().map(|ca| ca.der()).collect()).expect("bundle")
    }))
    .expect("bundle set")
}

fn server_config(store: &TrustStore, leaf: &Leaf) -> Arc<ServerConfig> {
    Arc::new(store.server_config(leaf.resolver()).expect("server config"))
}

fn client_config(store: &TrustStore, expected: &str, leaf: &Leaf) -> Arc<ClientConfig> {
    let expected = Expected::Workload(id(expected));
    Arc::new(
        store
            .client_config(expected, leaf.resolver())
            .expect("client config"),
    )
}

/// The outcome of one connection: what the server proved of the client, and the client of
/// the server, or why each side failed.
struct Outcome {
    server: Result<WorkloadId, String>,
    client: Result<WorkloadId, String>,
}

impl Outcome {
    fn connected(&self) -> bool {
        self.server.is_ok() && self.client.is_ok()
    }
}

/// One TLS connection over loopback. The server writes a byte once it has accepted the
/// client, so that a client certificate refused after the client's side of the TLS 1.3
/// handshake finished still fails the client.
async fn connect(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let serving = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let peer = peer_identity(tls.get_ref().1).map_err(|e| e.to_string())?;
        tls.write_all(b"!").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok(peer)
    });
    let dialling = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        // The name is not checked; servers are known by their SPIFFE id.
        let name = ServerName::try_from("spiffe.invalid").expect("name");
        let mut tls = TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut byte = [0];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        peer_identity(tls.get_ref().1).map_err(|e| e.to_string())
    };
    let client = tokio::time::timeout(Duration::from_secs(5), dialling)
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    let server = tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .map_or_else(|_| Err("timed out".into()), |r| r.expect("server task"));
    Outcome { server, client }
}

#[tokio::test]
async fn a_good_pair_connects_and_each_learns_the_other() {
    let root = Ca::root("a-root");
    let store = TrustStore::new(set(&[("a.test", &[&root])])).expect("store");
    // The server's CA is an intermediate under the root: the chain travels in the handshake.
    let server = server_config(&store, &root.intermediate("a-ca").leaf(SERVER));
    let outcome = connect(server, client_config(&store, SERVER, &root.leaf(CLIENT))).await;
    assert_eq!(outcome.server, Ok(id(CLIENT)));
    assert_eq!(outcome.client, Ok(id(SERVER)));
}

/// Leaves a trusted CA (or a rogue one) issues with one flaw each: the case, what the
/// refusing side says, the leaf.
fn bad_leaves(root: &Ca, as_id: &str) -> Vec<(&'static str, &'static str, Leaf)> {
    let with = |sans: Vec<SanType>, change: fn(&mut CertificateParams)| {
        let mut p = leaf_params(sans);
        change(&mut p);
        root.issue(p)
    };
    let unchanged: fn(&mut CertificateParams) = |_| {};
    let dns = |name: &str| SanType::DnsName(name.try_into().expect("IA5"));
    let long = format!("spiffe://a.test/ns/demo/sa/{}", "a".repeat(2100));
    vec![
        (
            "untrusted root (1)",
            "UnknownIssuer",
            Ca::root("rogue").leaf(as_id),
        ),
        ("expired (3)", "certificate expired", {
            let mut p = leaf_params(vec![uri(as_id)]);
            valid(&mut p, now_secs() - 7200, now_secs() - 1);
            root.issue(p)
        }),
        ("not yet valid (3)", "not valid yet", {
            let mut p = leaf_params(vec![uri(as_id)]);
            valid(&mut p, now_secs() + 600, now_secs() + 7200);
            root.issue(p)
        }),
        (
            "two URI SANs (4)",
            "2 URI SANs",
            with(
                vec![uri(as_id), uri("spiffe://a.test/ns/demo/sa/x")],
                unchanged,
            ),
        ),
        (
            "leaf cA=true (5)",
            "is a CA",
            with(vec![uri(as_id)], |p| {
                p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            }),
        ),
        (
            "keyCertSign (5)",
            "keyCertSign",
            with(vec![uri(as_id)], |p| {
                p.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                ];
            }),
        ),
        (
            "id with no path (5)",
            "not a workload",
            with(vec![uri("spiffe://a.test")], unchanged),
        ),
        (
            "non-spiffe scheme (5)",
            "scheme is missing or invalid",
            with(vec![uri("https://a.test/ns/demo/sa/client")], unchanged),
        ),
        (
            "%-encoding (5)",
            "path segment characters",
            with(vec![uri("spiffe://a.test/ns/demo/sa/%63lient")], unchanged),
        ),
        (
            "dot-dot (5)",
            "dot segments",
            with(
                vec![uri("spiffe://a.test/ns/demo/../demo/sa/client")],
                unchanged,
            ),
        ),
        (
            "uppercase trust domain (5)",
            "lowercase",
            with(vec![uri("spiffe://A.test/ns/demo/sa/client")], unchanged),
        ),
        (
            "id over 2048 bytes (5)",
            "longer than 2048 bytes",
            with(vec![uri(&long)], unchanged),
        ),
        (
            "trust domain b signed by a's root (6)",
            "UnknownIssuer",
            root.leaf("spiffe://b.test/ns/demo/sa/client"),
        ),
        (
            "unfederated trust domain (6)",
            "not trusted",
            Ca::root("c-root").leaf("spiffe://c.test/ns/demo/sa/client"),
        ),
        (
            "NUL in the URI SAN (7)",
            "NUL",
            with(vec![uri(&format!("{as_id}\0.evil"))], unchanged),
        ),
        (
            "DNS SAN spelling the id, no URI SAN (7)",
            "no URI SAN",
            with(vec![dns(as_id)], unchanged),
        ),
        (
            "otherName spelling the id, no URI SAN (7)",
            "no URI SAN",
            with(
                vec![SanType::OtherName((
                    vec![1, 3, 6, 1, 4, 1, 311, 20, 2, 3],
                    OtherNameValue::Utf8String(as_id.into()),
                ))],
                unchanged,
            ),
        ),
    ]
}

#[tokio::test]
async fn every_bad_certificate_fails_the_handshake_on_either_side() {
    let (ra, rb) = (Ca::root("a-root"), Ca::root("b-root"));
    let store = TrustStore::new(set(&[("a.test", &[&ra]), ("b.test", &[&rb])])).expect("store");
    let (good_client, good_server) = (ra.leaf(CLIENT), ra.leaf(SERVER));

    for (case, says, leaf) in bad_leaves(&ra, CLIENT) {
        let outcome = connect(
            server_config(&store, &good_server),
            client_config(&store, SERVER, &leaf),
        )
        .await;
        let refusal = outcome.server.expect_err(case);
        assert!(refusal.contains(says), "{case}: the server says {refusal}");
        assert!(outcome.client.is_err(), "{case}: the client carried on");
    }
    for (case, says, leaf) in bad_leaves(&ra, SERVER) {
        let outcome = connect(
            server_config(&store, &leaf),
            client_config(&store, SERVER, &good_client),
        )
        .await;
        let refusal = outcome.client.expect_err(case);
        assert!(refusal.contains(says), "{case}: the client says {refusal}");
        assert!(outcome.server.is_err(), "{case}: the server carried on");
    }
    // A client with no certificate has no identity.
    let anonymous =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(store.server_verifier(Expected::Workload(id(SERVER))))
            .with_no_client_auth();
    let outcome = connect(server_config(&store, &good_server), Arc::new(anonymous)).await;
    let refusal = outcome.server.expect_err("no client certificate");
    assert!(refusal.contains("peer sent no certificates"), "{refusal}");
    // A genuine server that is not the one the client meant to reach.
    let outcome = connect(
        server_config(&store, &ra.leaf("spiffe://a.test/ns/demo/sa/other")),
        client_config(&store, SERVER, &good_client),
    )
    .await;
    assert!(!outcome.connected());
    assert!(
        outcome
            .client
            .as_ref()
            .is_err_and(|e| e.contains("not the expected server")),
        "{:?}",
        outcome.client
    );
    // And the good pair, on the same store, for contrast.
    let outcome = connect(
        server_config(&store, &good_server),
        client_config(&store, SERVER, &good_client),
    )
    .await;
    assert!(
        outcome.connected(),
        "{:?} {:?}",
        outcome.server,
        outcome.client
    );
}

/// A clock stopped at one instant.
#[derive(Debug)]
struct Stopped(u64);

impl TimeProvider for Stopped {
    fn current_time(&self) -> Option<UnixTime> {
        Some(at(self.0))
    }
}

#[tokio::test]
async fn validity_holds_from_not_before_to_not_after_included() {
    let root = Ca::root("a-root");
    let (from, until) = (2_000_000_000, 2_000_003_600);
    let issue = |id: &str, from, until| {
        let mut p = leaf_params(vec![uri(id)]);
        valid(&mut p, from, until);
        root.issue(p)
    };
    let (client, server) = (
        issue(CLIENT, from, until),
        issue(SERVER, from - 60, until + 60),
    );
    for (secs, ok) in [
        (from - 1, false),
        (from, true),
        (until, true),
        (until + 1, false),
    ] {
        let store = TrustStore::new(set(&[("a.test", &[&root])]))
            .expect("store")
            .with_clock(Arc::new(Stopped(secs)));
        let outcome = connect(
            server_config(&store, &server),
            client_config(&store, SERVER, &client),
        )
        .await;
        assert_eq!(outcome.connected(), ok, "at {secs}: {:?}", outcome.server);
    }
}

#[tokio::test]
async fn a_root_rotates_under_unchanged_configurations() {
    let (r1, r2) = (Ca::root("r1"), Ca::root("r2"));
    let steps = [
        (set(&[("a.test", &[&r1])]), true, false),
        (set(&[("a.test", &[&r1, &r2])]), true, true),
        (set(&[("a.test", &[&r2])]), false, true),
    ];

    // Configurations are reused across connections, so a resumed session would let an R1 peer
    // back in after R1 left; the store's configurations turn resumption off.

    // The server's bundle rotates; clients with R1 and R2 leaves knock.
    let rotating = TrustStore::new(steps[0].0.clone()).expect("store");
    let fixed = TrustStore::new(set(&[("a.test", &[&r1, &r2])])).expect("store");
    let server = server_config(&rotating, &r2.leaf(SERVER));
    let client_r1 = client_config(&fixed, SERVER, &r1.leaf(CLIENT));
    let client_r2 = client_config(&fixed, SERVER, &r2.leaf(CLIENT));
    for (step, (bundles, r1_ok, r2_ok)) in steps.iter().enumerate() {
        rotating.replace(bundles.clone()).expect("replace");
        let by_r1 = connect(server.clone(), client_r1.clone()).await;
        let by_r2 = connect(server.clone(), client_r2.clone()).await;
        assert_eq!(
            by_r1.connected(),
            *r1_ok,
            "step {step}, R1 client: {:?}",
            by_r1.server
        );
        assert_eq!(
            by_r2.connected(),
            *r2_ok,
            "step {step}, R2 client: {:?}",
            by_r2.server
        );
    }

    // The client's bundle rotates; servers with R1 and R2 leaves answer.
    let rotating = TrustStore::new(steps[0].0.clone()).expect("store");
    let server_r1 = server_config(&fixed, &r1.leaf(SERVER));
    let server_r2 = server_config(&fixed, &r2.leaf(SERVER));
    let client = client_config(&rotating, SERVER, &r1.leaf(CLIENT));
    for (step, (bundles, r1_ok, r2_ok)) in steps.iter().enumerate() {
        rotating.replace(bundles.clone()).expect("replace");
        let to_r1 = connect(server_r1.clone(), client.clone()).await;
        let to_r2 = connect(server_r2.clone(), client.clone()).await;
        assert_eq!(
            to_r1.connected(),
            *r1_ok,
            "step {step}, R1 server: {:?}",
            to_r1.client
        );
        assert_eq!(
            to_r2.connected(),
            *r2_ok,
            "step {step}, R2 server: {:?}",
            to_r2.client
        );
    }
}

#[tokio::test]
async fn federating_a_trust_domain_admits_its_workloads() {
    let (ra, rb) = (Ca::root("a-root"), Ca::root("b-root"));
    let store = TrustStore::new(set(&[("a.test", &[&ra])])).expect("store");
    let server = server_config(&store, &ra.leaf(SERVER));
    let b_client = client_config(
        &store,
        SERVER,
        &rb.leaf("spiffe://b.test/ns/demo/sa/client"),
    );
    let outcome = connect(server.clone(), b_client.clone()).await;
    assert!(
        outcome
            .server
            .as_ref()
            .is_err_and(|e| e.contains("b.test is not trusted")),
        "{:?}",
        outcome.server
    );
    store
        .replace(set(&[("a.test", &[&ra]), ("b.test", &[&rb])]))
        .expect("federate b");
    let outcome = connect(server, b_client).await;
    assert_eq!(outcome.server, Ok(id("spiffe://b.test/ns/demo/sa/client")));
}
