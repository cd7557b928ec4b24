//! `weft ca` end to end on loopback: a CA served over TLS, following a tracker's view, signing
//! for pods of the calling node only (THREATS 12), deciding on every call rather than per
//! channel and building every leaf from its own template (THREATS 13), refusing bad input with
//! clear statuses, and authenticating nodes with bootstrap tokens or TokenReview.

mod apiserver;
mod pki;
mod tracking;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel};
use weft::ca::authn::{Authenticator, AuthnError};
use weft::ca::client::{self as ca_client, CaClientError};
use weft::ca::{Authorizer, BootstrapTokens, Ca, Signer, TokenReviewer, TtlLimits, pb};
use weft::model::{ClusterId, Pod};
use weft::tracker::client;
use weft::tracker::replica::Replica;
use weft::tracker::server::Tracker;
use weft::tracker::tls::ServingFiles;
use weft::tracker::view::{Change, View};
use weft::tracker::wire::{self, Object};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use apiserver::{ApiServer, TokenUser};

const C1: &str = "cluster-1";
const C2: &str = "cluster-2";
const TA: &str = "token-of-node-a-0123456789";
const TB: &str = "token-of-node-b-0123456789";
const WEB: &str = "spiffe://cluster-1/ns/demo/sa/web";

fn cid(s: &str) -> ClusterId {
    ClusterId::new(s).expect("cluster id")
}

/// Pod `name` of namespace demo in `cluster` on `node`, with service account `sa`.
fn pod(cluster: &str, name: &str, node: &str, sa: &str, phase: &str) -> Object {
    Object::Pod(
        Pod::from_api(
            &cid(cluster),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "demo", "uid": format!("{cluster}-{name}")},
                "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
                "status": {"phase": phase}}))
            .expect("pod"),
        )
        .expect("valid"),
    )
}

fn status(cluster: &str, synced: bool) -> wire::pb::ClusterStatus {
    wire::pb::ClusterStatus {
        cluster: cluster.into(),
        synced,
        connected: true,
        ..Default::default()
    }
}

/// The pods of both clusters: on node-a of cluster-1 a Running `web` and a finished `job`;
/// `db` on node-b; in cluster-2, on a node also named node-a, `api` and another `web`.
fn pods() -> Vec<Object> {
    vec![
        pod(C1, "web-1", "node-a", "web", "Running"),
        pod(C1, "job-1", "node-a", "job", "Succeeded"),
        pod(C1, "db-1", "node-b", "db", "Running"),
        pod(C2, "api-1", "node-a", "api", "Running"),
        pod(C2, "web-9", "node-b", "web", "Running"),
    ]
}

/// A CA of cluster-1 served over TLS, its tracker, and what it reads.
struct Fixture {
    dir: tempfile::TempDir,
    tracker: Tracker,
    view: Arc<RwLock<Replica>>,
    tokens: PathBuf,
    url: String,
    root: String,
}

/// A CA with these limits that authenticates with the bootstrap token file (node-a: TA,
/// node-b: TB), or with `authn` when given.
async fn fixture(limits: TtlLimits, authn: Option<Arc<dyn Authenticator>>) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = pki::Pki::new(dir.path(), "root");
    let tracker = Tracker::new(View::new("e1", 100), 1 << 20);
    tracker.apply(Change {
        upserts: pods(),
        clusters: vec![status(C1, true), status(C2, true)],
        ..Change::default()
    });
    let target = tracking::serve(&tracker).await;
    let view = Arc::new(RwLock::new(Replica::new()));
    let request = wire::pb::SubscribeRequest {
        cluster: C1.into(),
        ..Default::default()
    };
    tokio::spawn(client::follow(
        target,
        request,
        view.clone(),
        Duration::from_millis(100),
    ));
    tracking::wait_for(&view, "a ready view", Replica::ready).await;
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TA} node-a\n{TB} node-b\n")).expect("write");
    let td = weft::identity::trust_domain_for(&cid(C1), None).expect("td");
    let signer =
        Signer::load(&pki.ca_file(), &pki.ca_key_file(), None, &td, limits).expect("signer");
    let serving = pki.issue("serving", "spiffe://cluster-1/weft/ca");
    let identity = ServingFiles::load(&serving.cert, &serving.key).expect("serving identity");
    let authn = authn.unwrap_or_else(|| Arc::new(BootstrapTokens::load(&tokens).expect("tokens")));
    let ca = Ca::new(signer, authn, Authorizer::new(cid(C1), td, view.clone()));
    let url = tracking::serve_ca(ca, identity).await;
    let root = std::fs::read_to_string(pki.ca_file()).expect("root");
    Fixture {
        dir,
        tracker,
        view,
        tokens,
        url,
        root,
    }
}

impl Fixture {
    async fn channel(&self) -> Channel {
        ca_client::connect(&self.url, Certificate::from_pem(&self.root))
            .await
            .expect("connect")
    }

    /// Applies `change` to the tracker and waits until the CA's view has it.
    async fn change(&self, change: Change, what: &str, done: impl Fn(&Replica) -> bool) {
        self.tracker.apply(change);
        tracking::wait_for(&self.view, what, done).await;
    }
}

/// A CSR for a new P-256 key, with these URI SANs: (PEM, the key's PKCS#8 DER).
fn csr(uris: &[&str]) -> (String, Vec<u8>) {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("uri")))
        .collect();
    let key = KeyPair::generate().expect("key");
    let csr = p.serialize_request(&key).expect("csr");
    (csr.pem().expect("pem"), key.serialize_der())
}

/// Calls the CA with `authorization` (if any) as is.
async fn raw(
    channel: Channel,
    authorization: Option<&[u8]>,
    request: pb::CreateCertificateRequest,
) -> Result<pb::CreateCertificateResponse, tonic::Status> {
    let mut request = tonic::Request::new(request);
    if let Some(value) = authorization {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(value).expect("a header value"),
        );
    }
    pb::ca_client::CaClient::new(channel)
        .create_certificate(request)
        .await
        .map(tonic::Response::into_inner)
}

fn request(csr: &str, identity: &str, ttl: u64) -> pb::CreateCertificateRequest {
    pb::CreateCertificateRequest {
        csr: csr.as_bytes().to_vec(),
        identity: identity.into(),
        ttl_seconds: ttl,
    }
}

/// The status code of a refused call through the node agent's client.
async fn refused(channel: &Channel, token: &str, identity: &str) -> Code {
    let (csr, _) = csr(&[]);
    match ca_client::create_certificate(
        channel.clone(),
        token,
        csr.as_bytes(),
        identity,
        Duration::ZERO,
    )
    .await
    {
        Err(CaClientError::Refused(status)) => status.code(),
        other => panic!("{identity}: not refused: {other:?}"),
    }
}

fn ders(chain: &[String]) -> Vec<Vec<u8>> {
    chain
        .iter()
        .map(|p| {
            CertificateDer::from_pem_slice(p.as_bytes())
                .expect("PEM")
                .to_vec()
        })
        .collect()
}

#[tokio::test]
async fn a_pod_on_the_callers_node_gets_an_svid_built_from_the_template() {
    let f = fixture(TtlLimits::default(), None).await;
    let channel = f.channel().await;
    // The CSR asks to be a CA, for a DNS name and an IP besides its identity.
    let mut greedy = CertificateParams::default();
    greedy.distinguished_name = DistinguishedName::new();
    greedy.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    greedy.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    greedy.subject_alt_names = vec![
        SanType::URI(WEB.try_into().expect("uri")),
        SanType::DnsName("kubernetes.default".try_into().expect("dns")),
        SanType::IpAddress([10, 0, 0, 1].into()),
    ];
    let greedy_key = KeyPair::generate().expect("key");
    let greedy_csr = greedy
        .serialize_request(&greedy_key)
        .expect("csr")
        .pem()
        .expect("pem");
    let (plain_csr, plain_key) = csr(&[WEB]);
    for (csr, key, asked, granted) in [
        (plain_csr.clone(), plain_key.clone(), 3600, 3600),
        (plain_csr, plain_key, 0, 86400),
        (greedy_csr, greedy_key.serialize_der(), 30 * 86400, 86400),
    ] {
        let before = time::OffsetDateTime::now_utc();
        let svid = ca_client::create_certificate(
            channel.clone(),
            TA,
            csr.as_bytes(),
            WEB,
            Duration::from_secs(asked),
        )
        .await
        .expect("issued");
        assert_eq!(svid.ttl, Duration::from_secs(granted));
        let ders = ders(&svid.chain);
        assert_eq!(ders.len(), 2, "the leaf, then the CA");
        let parsed = spiffe::X509Svid::parse_from_der(&ders.concat(), &key).expect("an SVID");
        assert_eq!(parsed.spiffe_id().to_string(), WEB);
        let (_, leaf) = X509Certificate::from_der(&ders[0]).expect("leaf");
        let (_, ca) = X509Certificate::from_der(&ders[1]).expect("ca");
        leaf.verify_signature(Some(ca.public_key()))
            .expect("signed by the CA");
        let names = leaf
            .subject_alternative_name()
            .expect("san")
            .expect("san")
            .value
            .general_names
            .clone();
        assert_eq!(names, vec![GeneralName::URI(WEB)], "exactly one URI SAN");
        assert!(!leaf.is_ca());
        let ku = leaf.key_usage().expect("ku").expect("ku").value;
        assert!(ku.digital_signature() && ku.flags.count_ones() == 1);
        let eku = leaf.extended_key_usage().expect("eku").expect("eku").value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(leaf.raw_serial().len(), 16);
        assert_eq!(leaf.raw_serial()[0] & 0x80, 0);
        let backdated = before - leaf.validity().not_before.to_datetime();
        assert!(
            (299..=302).contains(&backdated.whole_seconds()),
            "NotBefore backdated by {backdated}"
        );
        let lifetime = leaf.validity().not_after.to_datetime() - before;
        assert!(
            (lifetime.whole_seconds() - granted as i64).abs() <= 2,
            "{lifetime}"
        );
    }
}

#[tokio::test]
async fn only_pods_of_this_cluster_running_on_the_callers_node_count() {
    let f = fixture(TtlLimits::default(), None).await;
    let channel = f.channel().await;
    for (token, identity, code) in [
        // db runs on node-b only.
        (
            TA,
            "spiffe://cluster-1/ns/demo/sa/db",
            Code::PermissionDenied,
        ),
        // job's pod on node-a has finished.
        (
            TA,
            "spiffe://cluster-1/ns/demo/sa/job",
            Code::PermissionDenied,
        ),
        // api runs on a node-a, but of cluster-2.
        (
            TA,
            "spiffe://cluster-1/ns/demo/sa/api",
            Code::PermissionDenied,
        ),
        // web runs on node-b too, but of cluster-2.
        (TB, WEB, Code::PermissionDenied),
        // Another trust domain than this CA's.
        (
            TA,
            "spiffe://cluster-2/ns/demo/sa/api",
            Code::PermissionDenied,
        ),
        (
            TA,
            "spiffe://cluster-1/ns/other/sa/web",
            Code::PermissionDenied,
        ),
    ] {
        assert_eq!(refused(&channel, token, identity).await, code, "{identity}");
    }
    let (csr, _) = csr(&[]);
    ca_client::create_certificate(
        channel.clone(),
        TB,
        csr.as_bytes(),
        "spiffe://cluster-1/ns/demo/sa/db",
        Duration::ZERO,
    )
    .await
    .expect("db for node-b");
    // A pod that left the view entitles nobody, even if a stale caller still asks.
    f.change(
        Change {
            deletes: vec![pod(C1, "db-1", "node-b", "db", "Running").key()],
            ..Change::default()
        },
        "db-1 gone",
        |r| r.pods_on_node(&cid(C1), "node-b").next().is_none(),
    )
    .await;
    assert_eq!(
        refused(&channel, TB, "spiffe://cluster-1/ns/demo/sa/db").await,
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn every_call_is_decided_again_on_the_same_channel() {
    let f = fixture(TtlLimits::default(), None).await;
    let channel = f.channel().await;
    let call = |token: &'static str| {
        let channel = channel.clone();
        async move {
            let (csr, _) = csr(&[WEB]);
            ca_client::create_certificate(channel, token, csr.as_bytes(), WEB, Duration::ZERO).await
        }
    };
    call(TA).await.expect("first call");
    // Half a view decides nothing: the CA says to come back.
    f.change(
        Change {
            clusters: vec![status(C2, false)],
            ..Change::default()
        },
        "cluster-2 unsynced",
        |r| !r.ready(),
    )
    .await;
    assert_eq!(refused(&channel, TA, WEB).await, Code::Unavailable);
    f.change(
        Change {
            clusters: vec![status(C2, true)],
            ..Change::default()
        },
        "cluster-2 synced",
        Replica::ready,
    )
    .await;
    call(TA).await.expect("synced again");
    // The node's pod is evicted between two calls on one channel.
    f.change(
        Change {
            deletes: vec![pod(C1, "web-1", "node-a", "web", "Running").key()],
            ..Change::default()
        },
        "web-1 gone",
        |r| {
            r.pods_on_node(&cid(C1), "node-a")
                .all(|p| p.name != "web-1")
        },
    )
    .await;
    assert_eq!(refused(&channel, TA, WEB).await, Code::PermissionDenied);
    f.change(
        Change {
            upserts: vec![pod(C1, "web-2", "node-a", "web", "Running")],
            ..Change::default()
        },
        "web-2 on node-a",
        |r| {
            r.pods_on_node(&cid(C1), "node-a")
                .any(|p| p.name == "web-2")
        },
    )
    .await;
    call(TA).await.expect("a new web pod on node-a");
    // The node's token is revoked between two calls on one channel.
    let next = f.dir.path().join("tokens.new");
    std::fs::write(&next, format!("{TB} node-b\n")).expect("write");
    std::fs::rename(&next, &f.tokens).expect("rename");
    assert_eq!(refused(&channel, TA, WEB).await, Code::Unauthenticated);
}

/// A call that must be refused: what it is, its authorization, its request, the status code
/// and what the message says.
type BadCall<'a> = (
    &'a str,
    Option<&'a [u8]>,
    pb::CreateCertificateRequest,
    Code,
    &'a str,
);

#[tokio::test]
async fn bad_input_gets_a_clear_status_and_the_ca_carries_on() {
    let f = fixture(TtlLimits::default(), None).await;
    let channel = f.channel().await;
    let bearer = format!("Bearer {TA}");
    let (good, _) = csr(&[WEB]);
    let (other, _) = csr(&["spiffe://cluster-1/ns/demo/sa/db"]);
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
        .expect("der");
    let mut forged = der.to_vec();
    let at = forged.len() - 3;
    forged[at] ^= 0x55;
    let cases: Vec<BadCall<'_>> = vec![
        (
            "no credentials",
            None,
            request(&good, WEB, 0),
            Code::Unauthenticated,
            "no authorization",
        ),
        (
            "not bearer",
            Some(b"Basic YWxhZGRpbjpvcGVuc2VzYW1l"),
            request(&good, WEB, 0),
            Code::Unauthenticated,
            "not `Bearer TOKEN`",
        ),
        (
            "empty bearer",
            Some(b"Bearer "),
            request(&good, WEB, 0),
            Code::Unauthenticated,
            "not `Bearer TOKEN`",
        ),
        (
            "binary",
            Some(b"Bearer \xff\xfe"),
            request(&good, WEB, 0),
            Code::Unauthenticated,
            "not `Bearer TOKEN`",
        ),
        (
            "unknown token",
            Some(b"Bearer token-nobody-has-0123456789"),
            request(&good, WEB, 0),
            Code::Unauthenticated,
            "not a known bootstrap token",
        ),
        (
            "garbage csr",
            Some(bearer.as_bytes()),
            request("garbage", WEB, 0),
            Code::InvalidArgument,
            "not a PKCS#10",
        ),
        (
            "empty csr",
            Some(bearer.as_bytes()),
            request("", WEB, 0),
            Code::InvalidArgument,
            "not a PKCS#10",
        ),
        (
            "forged csr",
            Some(bearer.as_bytes()),
            pb::CreateCertificateRequest {
                csr: forged,
                identity: WEB.into(),
                ttl_seconds: 0,
            },
            Code::InvalidArgument,
            "signature does not verify",
        ),
        (
            "another identity",
            Some(bearer.as_bytes()),
            request(&other, WEB, 0),
            Code::InvalidArgument,
            "not the requested identity",
        ),
        (
            "empty identity",
            Some(bearer.as_bytes()),
            request(&good, "", 0),
            Code::InvalidArgument,
            "identity",
        ),
        (
            "not spiffe",
            Some(bearer.as_bytes()),
            request(&good, "https://cluster-1/ns/demo/sa/web", 0),
            Code::InvalidArgument,
            "not a SPIFFE id",
        ),
        (
            "not a workload",
            Some(bearer.as_bytes()),
            request(&good, "spiffe://cluster-1/weft/admin/x", 0),
            Code::InvalidArgument,
            "not a workload",
        ),
        (
            "dot segment",
            Some(bearer.as_bytes()),
            request(&good, "spiffe://cluster-1/ns/demo/sa/../web", 0),
            Code::InvalidArgument,
            "not a SPIFFE id",
        ),
        (
            "uppercase",
            Some(bearer.as_bytes()),
            request(&good, "spiffe://Cluster-1/ns/demo/sa/web", 0),
            Code::InvalidArgument,
            "lowercase",
        ),
        (
            "nul",
            Some(bearer.as_bytes()),
            request(&good, "spiffe://cluster-1/ns/demo/sa/web\u{0}", 0),
            Code::InvalidArgument,
            "not a SPIFFE id",
        ),
    ];
    for (what, auth, req, code, says) in cases {
        let status = raw(channel.clone(), auth, req).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(says),
            "{what}: {}",
            status.message()
        );
    }
    let huge = pb::CreateCertificateRequest {
        csr: vec![b'x'; 256 << 10],
        identity: WEB.into(),
        ttl_seconds: 0,
    };
    let status = raw(channel.clone(), Some(bearer.as_bytes()), huge)
        .await
        .expect_err("oversized");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    // Two authorization entries are one too many.
    let mut twice = tonic::Request::new(request(&good, WEB, 0));
    for _ in 0..2 {
        twice.metadata_mut().append(
            "authorization",
            MetadataValue::try_from(bearer.as_str()).expect("value"),
        );
    }
    let status = pb::ca_client::CaClient::new(channel.clone())
        .create_certificate(twice)
        .await
        .expect_err("two entries");
    assert_eq!(status.code(), Code::Unauthenticated);
    raw(channel, Some(bearer.as_bytes()), request(&good, WEB, 0))
        .await
        .expect("the CA still serves");
    // The client refuses what it cannot send.
    let e = ca_client::create_certificate(
        f.channel().await,
        "bad\ntoken",
        good.as_bytes(),
        WEB,
        Duration::ZERO,
    )
    .await
    .expect_err("a token with a newline");
    assert!(matches!(e, CaClientError::Token), "{e}");
}

#[tokio::test]
async fn node_agents_verify_the_ca_against_their_root() {
    let f = fixture(TtlLimits::default(), None).await;
    let rogue = pki::Pki::new(f.dir.path(), "rogue");
    let root = std::fs::read_to_string(rogue.ca_file()).expect("read");
    let outcome = match ca_client::connect(&f.url, Certificate::from_pem(root)).await {
        Err(e) => Err(e),
        Ok(channel) => {
            let (csr, _) = csr(&[]);
            ca_client::create_certificate(channel, TA, csr.as_bytes(), WEB, Duration::ZERO)
                .await
                .map(|_| ())
        }
    };
    assert!(outcome.is_err(), "a CA that the root did not sign");
    let e = ca_client::connect(
        &f.url.replace("https", "http"),
        Certificate::from_pem(&f.root),
    )
    .await
    .expect_err("plaintext");
    assert!(e.to_string().contains("https://"), "{e}");
}

#[tokio::test]
async fn a_minimum_of_seconds_for_tests() {
    let limits = TtlLimits::new(Duration::from_secs(2), Duration::from_secs(5)).expect("limits");
    let f = fixture(limits, None).await;
    let (csr, _) = csr(&[]);
    let svid = ca_client::create_certificate(
        f.channel().await,
        TA,
        csr.as_bytes(),
        WEB,
        Duration::from_secs(1),
    )
    .await
    .expect("issued");
    assert_eq!(svid.ttl, Duration::from_secs(2), "raised to the minimum");
}

const AUDIENCE: &str = "weft-ca";

/// A fake API server with the node agent's pod on node-b (uid `uid-agent-b`), and a reviewer
/// of its tokens.
async fn reviewing() -> (ApiServer, TokenReviewer) {
    let server = ApiServer::start().await;
    server.apply(
        apiserver::Kind::Pod,
        serde_json::json!({
            "metadata": {"name": "weft-node-b", "namespace": "weft-system", "uid": "uid-agent-b"},
            "spec": {"nodeName": "node-b", "serviceAccountName": "weft-node", "containers": []},
            "status": {"phase": "Running"}}),
    );
    let reviewer = TokenReviewer::new(server.client(), AUDIENCE, "weft-system", "weft-node");
    (server, reviewer)
}

fn agent(pod: &str, uid: &str, node: Option<&str>) -> TokenUser {
    TokenUser::bound("weft-system", "weft-node", AUDIENCE, pod, uid, node)
}

#[tokio::test]
async fn token_review_names_the_node_of_the_agents_bound_token() {
    let (server, reviewer) = reviewing().await;
    server.add_reviewed_token(
        "t-node-name",
        agent("weft-node-a", "uid-agent-a", Some("node-a")),
    );
    server.add_reviewed_token("t-bound-pod", agent("weft-node-b", "uid-agent-b", None));
    server.add_reviewed_token("t-stale-pod", agent("weft-node-b", "uid-earlier", None));
    server.add_reviewed_token("t-gone-pod", agent("weft-node-z", "uid-z", None));
    server.add_reviewed_token(
        "t-audience",
        TokenUser::bound(
            "weft-system",
            "weft-node",
            "https://kubernetes.default.svc",
            "weft-node-b",
            "uid-agent-b",
            None,
        ),
    );
    server.add_reviewed_token(
        "t-workload",
        TokenUser::bound("demo", "web", AUDIENCE, "web-1", "uid-web", Some("node-a")),
    );
    let mut unbound = agent("weft-node-b", "uid-agent-b", None);
    unbound.extra.clear();
    server.add_reviewed_token("t-unbound", unbound);
    assert_eq!(
        reviewer.authenticate("t-node-name").await,
        Ok("node-a".into())
    );
    assert_eq!(
        reviewer.authenticate("t-bound-pod").await,
        Ok("node-b".into())
    );
    for (token, says) in [
        ("t-unknown", "token refused: [invalid bearer token"),
        ("t-audience", "token audiences is invalid"),
        (
            "t-workload",
            "system:serviceaccount:demo:web is not the node agent (system:serviceaccount:weft-system:weft-node)",
        ),
        ("t-stale-pod", "bound to an earlier pod named weft-node-b"),
        ("t-gone-pod", "the bound pod weft-node-z is gone"),
        ("t-unbound", "bound to no pod"),
    ] {
        let e = reviewer.authenticate(token).await.expect_err(token);
        assert!(e.to_string().contains(says), "{token}: {e}");
    }
    server.revoke_reviewed_token("t-node-name");
    assert!(matches!(
        reviewer.authenticate("t-node-name").await,
        Err(AuthnError::Refused(_))
    ));
    server.set_fault(apiserver::Fault::InternalError);
    assert!(matches!(
        reviewer.authenticate("t-bound-pod").await,
        Err(AuthnError::Unavailable(_))
    ));
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.starts_with("/apis/authentication.k8s.io/v1/tokenreviews")),
        "{:?}",
        server.requests()
    );
}

#[tokio::test]
async fn a_ca_authenticating_with_token_review_refuses_a_revoked_token_on_the_same_channel() {
    let (server, reviewer) = reviewing().await;
    server.add_reviewed_token(
        "agent-a",
        agent("weft-node-a", "uid-agent-a", Some("node-a")),
    );
    let f = fixture(TtlLimits::default(), Some(Arc::new(reviewer))).await;
    let channel = f.channel().await;
    let (csr, _) = csr(&[WEB]);
    ca_client::create_certificate(
        channel.clone(),
        "agent-a",
        csr.as_bytes(),
        WEB,
        Duration::ZERO,
    )
    .await
    .expect("issued");
    server.revoke_reviewed_token("agent-a");
    assert_eq!(
        refused(&channel, "agent-a", WEB).await,
        Code::Unauthenticated
    );
    server.set_fault(apiserver::Fault::InternalError);
    assert_eq!(refused(&channel, "agent-a", WEB).await, Code::Unavailable);
}

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/two-cluster/1-no-policy"
);

/// A `weft` process, killed when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn weft(args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_weft"));
    command.args(args).env("RUST_LOG", "warn");
    command
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Runs `weft` to completion: (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = weft(args).output().expect("run weft");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn weft_ca_with_the_development_pki_follows_a_tracker_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("certs");
    let out_s = out.to_str().expect("utf-8");
    let (ok, stdout, stderr) = run(&[
        "certs",
        "init",
        "--out",
        out_s,
        "--trust-domain",
        "cluster-1",
        "--trust-domain",
        "cluster-2",
        "--nodes",
        "1",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("cluster-2") && stdout.contains("bootstrap-tokens"),
        "{stdout}"
    );
    let (ok, _, stderr) = run(&[
        "certs",
        "init",
        "--out",
        out_s,
        "--trust-domain",
        "cluster-1",
    ]);
    assert!(!ok && stderr.contains("--force"), "{stderr}");
    let (ok, _, stderr) = run(&[
        "certs",
        "init",
        "--out",
        out_s,
        "--trust-domain",
        "Cluster-1",
    ]);
    assert!(
        !ok && stderr.contains("--trust-domain Cluster-1"),
        "{stderr}"
    );

    let pki = out.join("cluster-1");
    let file = |name: &str| pki.join(name).to_str().expect("utf-8").to_owned();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TA} c1-node-1\n")).expect("write");
    let (tracker_port, admin_port, ca_port, ca_admin) =
        (free_port(), free_port(), free_port(), free_port());
    let _tracker = Running(
        weft(&[
            "tracker",
            "--clusters",
            EXAMPLE,
            "--listen",
            &format!("127.0.0.1:{tracker_port}"),
            "--admin",
            &format!("127.0.0.1:{admin_port}"),
            "--tls-cert",
            &file("tracker.pem"),
            "--tls-key",
            &file("tracker-key.pem"),
            "--tls-ca",
            &file("root.pem"),
        ])
        .spawn()
        .expect("tracker"),
    );
    let _ca = Running(
        weft(&[
            "ca",
            "--cluster",
            "cluster-1",
            "--ca-cert",
            &file("root.pem"),
            "--ca-key",
            &file("root-key.pem"),
            "--listen",
            &format!("127.0.0.1:{ca_port}"),
            "--admin",
            &format!("127.0.0.1:{ca_admin}"),
            "--serving-cert",
            &file("ca.pem"),
            "--serving-key",
            &file("ca-key.pem"),
            "--bootstrap-tokens",
            tokens.to_str().expect("utf-8"),
            "--tracker",
            &format!("https://127.0.0.1:{tracker_port}"),
            // The CA's own identity: its cluster's view, as no node.
            "--tls-cert",
            &file("ca-client.pem"),
            "--tls-key",
            &file("ca-client-key.pem"),
            "--tls-ca",
            &file("root.pem"),
            "--max-ttl",
            "1h",
        ])
        .spawn()
        .expect("ca"),
    );
    let root = std::fs::read_to_string(pki.join("root.pem")).expect("root");
    let url = format!("https://127.0.0.1:{ca_port}");
    let id = "spiffe://cluster-1/ns/demo-c1/sa/default";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let svid = loop {
        let outcome = match ca_client::connect(&url, Certificate::from_pem(&root)).await {
            Ok(channel) => {
                let (csr, _) = csr(&[id]);
                ca_client::create_certificate(channel, TA, csr.as_bytes(), id, Duration::ZERO).await
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(svid) => break svid,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the CA never issued: {e}"),
        }
    };
    assert_eq!(svid.ttl, Duration::from_secs(3600));
    let channel = ca_client::connect(&url, Certificate::from_pem(&root))
        .await
        .expect("connect");
    // A pod of cluster-2's node, asked for by cluster-1's node: refused.
    assert_eq!(
        refused(&channel, TA, "spiffe://cluster-1/ns/demo-c2/sa/default").await,
        Code::PermissionDenied
    );
    // Its admin endpoint: ready, and the calls counted by outcome.
    let admin: std::net::SocketAddr = format!("127.0.0.1:{ca_admin}").parse().expect("addr");
    assert_eq!(tracking::http(admin, "GET", "/readyz").await.0, 200);
    let (code, metrics) = tracking::http(admin, "GET", "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "weft_ca_certificate_requests_total{outcome=\"ok\"} 1",
        "weft_ca_certificate_requests_total{outcome=\"permission_denied\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weft_ca_takes_its_trust_domain_from_the_clusters_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clusters = dir.path().join("clusters");
    for cluster in ["cluster-1", "cluster-2"] {
        let from = std::path::Path::new(EXAMPLE).join(cluster);
        let to = clusters.join(cluster);
        std::fs::create_dir_all(&to).expect("mkdir");
        for entry in std::fs::read_dir(&from).expect("read_dir") {
            let path = entry.expect("entry").path();
            std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    std::fs::write(
        clusters.join("cluster-1/cluster.yaml"),
        "trustDomain: prod.example\n",
    )
    .expect("write");
    let root = pki::Pki::new(dir.path(), "root");
    let serving = root.issue("serving", "spiffe://prod.example/weft/ca");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TA} c1-node-1\n")).expect("write");
    let (tracker_port, tracker_admin, ca_port, ca_admin) =
        (free_port(), free_port(), free_port(), free_port());
    let path = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();
    let _tracker = Running(
        weft(&[
            "tracker",
            "--insecure",
            "--clusters",
            &path(&clusters),
            "--listen",
            &format!("127.0.0.1:{tracker_port}"),
            "--admin",
            &format!("127.0.0.1:{tracker_admin}"),
        ])
        .spawn()
        .expect("tracker"),
    );
    let _ca = Running(
        weft(&[
            "ca",
            "--cluster",
            "cluster-1",
            "--ca-cert",
            &path(&root.ca_file()),
            "--ca-key",
            &path(&root.ca_key_file()),
            "--listen",
            &format!("127.0.0.1:{ca_port}"),
            "--admin",
            &format!("127.0.0.1:{ca_admin}"),
            "--serving-cert",
            &path(&serving.cert),
            "--serving-key",
            &path(&serving.key),
            "--bootstrap-tokens",
            &path(&tokens),
            "--tracker",
            &format!("http://127.0.0.1:{tracker_port}"),
            "--insecure",
        ])
        .spawn()
        .expect("ca"),
    );
    let url = format!("https://127.0.0.1:{ca_port}");
    let ca_root = std::fs::read_to_string(root.ca_file()).expect("root");
    let id = "spiffe://prod.example/ns/demo-c1/sa/default";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let channel = loop {
        let attempt = match ca_client::connect(&url, Certificate::from_pem(&ca_root)).await {
            Ok(channel) => {
                let (csr, _) = csr(&[id]);
                ca_client::create_certificate(
                    channel.clone(),
                    TA,
                    csr.as_bytes(),
                    id,
                    Duration::ZERO,
                )
                .await
                .map(|_| channel)
            }
            Err(e) => Err(e),
        };
        match attempt {
            Ok(channel) => break channel,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no certificate in the settings' trust domain: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // The id derived from the cluster's name is not this CA's trust domain.
    assert_eq!(
        refused(&channel, TA, "spiffe://cluster-1/ns/demo-c1/sa/default").await,
        Code::PermissionDenied
    );
}

#[test]
fn weft_ca_names_the_flag_or_file_at_fault() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().expect("utf-8");
    let base = |extra: &[&str]| {
        let mut args = vec![
            "ca",
            "--cluster",
            "cluster-1",
            "--ca-cert",
            missing,
            "--ca-key",
            missing,
            "--serving-cert",
            missing,
            "--serving-key",
            missing,
            "--tracker",
            "http://127.0.0.1:1",
            "--insecure",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    for (extra, says) in [
        (&[][..], "--bootstrap-tokens"),
        (
            &["--bootstrap-tokens", "t", "--max-ttl", "soon"][..],
            "--max-ttl",
        ),
        (
            &[
                "--bootstrap-tokens",
                "t",
                "--min-ttl",
                "2h",
                "--max-ttl",
                "1h",
            ][..],
            "exceeds the maximum",
        ),
        (&["--bootstrap-tokens", "t"][..], "--ca-cert"),
        (&["--kubeconfig", "k"][..], "--token-audience"),
        (&["--in-cluster"][..], "--token-audience"),
        (
            &["--bootstrap-tokens", "t", "--token-audience", "weft-ca"][..],
            "--token-audience",
        ),
        (
            &["--kubeconfig", "k", "--in-cluster", "--token-audience", "a"][..],
            "--in-cluster",
        ),
        (
            &["--bootstrap-tokens", "t", "--trust-domain", "Bad"][..],
            "--trust-domain",
        ),
    ] {
        let (ok, _, stderr) = base(extra);
        assert!(!ok, "{extra:?}");
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
    }
}

/// A renewed serving certificate is presented from the next connection on, with no restart
/// (the Secret's files replaced in place); files that change into what does not load leave
/// the last good ones in use.
#[tokio::test]
async fn a_renewed_serving_certificate_is_used_by_each_new_connection() {
    let f = fixture(TtlLimits::default(), None).await;
    let ask = async |channel: Channel| {
        let (csr, _) = csr(&[]);
        ca_client::create_certificate(channel, TA, csr.as_bytes(), WEB, Duration::ZERO).await
    };
    ask(f.channel().await).await.expect("signed");
    let (cert, key) = (
        f.dir.path().join("serving.pem"),
        f.dir.path().join("serving-key.pem"),
    );
    let (good_cert, good_key) = (
        f.dir.path().join("good.pem"),
        f.dir.path().join("good-key.pem"),
    );
    std::fs::copy(&cert, &good_cert).expect("kept");
    std::fs::copy(&key, &good_key).expect("kept");
    let renew = |with_cert: &Path, with_key: &Path| {
        std::fs::copy(with_cert, &cert).expect("renewed");
        std::fs::copy(with_key, &key).expect("renewed");
    };
    // Renewed by a CA the nodes do not trust: the next connection is refused at TLS.
    let rogue = pki::Pki::new(f.dir.path(), "rogue");
    let untrusted = rogue.issue("rogue-serving", "spiffe://cluster-1/weft/ca");
    renew(&untrusted.cert, &untrusted.key);
    let refused = ca_client::connect(&f.url, Certificate::from_pem(&f.root)).await;
    assert!(refused.is_err(), "a certificate the nodes do not trust");
    // Renewed by the cluster's CA: served again.
    renew(&good_cert, &good_key);
    ask(f.channel().await)
        .await
        .expect("signed after the renewal");
    // Files broken: the last good ones stay.
    std::fs::write(&cert, "not a certificate\n").expect("broken");
    ask(f.channel().await)
        .await
        .expect("the last good certificate, while the files are broken");
}

/// A node agent's root for the CA (`--ca-root`) is read again when its file changes: the
/// next call verifies the CA against the new roots; a file that changes into what does not
/// load leaves the last good roots; a bad file at start is refused, naming the flag.
#[tokio::test]
async fn a_node_s_renewed_ca_root_is_used_from_its_next_call() {
    use weft::identity::manager::Authority as _;
    let f = fixture(TtlLimits::default(), None).await;
    let file = f.dir.path().join("ca-root.pem");
    std::fs::write(&file, &f.root).expect("root");
    let ca = ca_client::RemoteCa::with_root_file(
        &f.url,
        &file,
        None,
        ca_client::Token::Fixed(TA.into()),
    )
    .expect("the CA");
    let web = weft::identity::WorkloadId::parse(WEB).expect("id");
    let sign = async || {
        let (pem, _) = csr(&[]);
        ca.sign(pem.into_bytes(), &web, Duration::ZERO).await
    };
    sign().await.expect("signed");

    // Only another CA's root: the CA no longer verifies.
    let rogue = pki::Pki::new(f.dir.path(), "rogue");
    std::fs::copy(rogue.ca_file(), &file).expect("replaced");
    sign()
        .await
        .expect_err("a root the CA's certificate does not chain to");
    // Both roots, as during a rotation: verified again.
    let both = format!(
        "{}{}",
        f.root,
        std::fs::read_to_string(rogue.ca_file()).expect("rogue")
    );
    std::fs::write(&file, both).expect("bundle");
    sign().await.expect("signed with the bundle");
    // Broken: the last good roots stay.
    std::fs::write(&file, "not a certificate\n").expect("broken");
    sign().await.expect("signed with the last good roots");

    // At start, a file that is no root is refused, named.
    let e = ca_client::RemoteCa::with_root_file(
        &f.url,
        &file,
        None,
        ca_client::Token::Fixed(TA.into()),
    )
    .expect_err("no root");
    assert!(
        e.to_string().starts_with("--ca-root ") && e.to_string().contains("no PEM certificate"),
        "{e}"
    );
    let e = ca_client::RemoteCa::with_root_file(
        "http://127.0.0.1:1",
        &file,
        None,
        ca_client::Token::Fixed(TA.into()),
    )
    .expect_err("plaintext");
    assert!(matches!(e, CaClientError::Url { .. }), "{e}");
}
