//! CA benchmark: signatures per second on one core (a P-256 CA signing P-256 CSRs: parse,
//! verify the CSR's signature, build the leaf from the template, sign, PEM), the cost of
//! authorising a call on a view of 100,000 pods (10 clusters × 100 nodes × 100 pods), and the
//! time for a node to obtain certificates for 100 new pods (its identity manager: keys, CSRs,
//! calls to a real CA over TLS following a real tracker).
//!
//! Run: `cargo bench --bench ca`.

#[path = "../tests/pki/mod.rs"]
mod pki;
#[path = "../tests/tracking/mod.rs"]
mod tracking;

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use criterion::Criterion;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose,
};
use weft::ca::{Authorizer, Signer, TtlLimits};
use weft::identity::{WorkloadId, trust_domain_for};
use weft::model::{ClusterId, Pod};
use weft::tracker::replica::Replica;
use weft::tracker::view::{Change, Scope, View};
use weft::tracker::wire::{Object, pb};

const CLUSTERS: usize = 10;
const NODES: usize = 100;
const PODS_PER_NODE: usize = 100;

/// A P-256 root CA of `cluster-0` in a temporary directory, loaded as the signer.
fn signer(dir: &std::path::Path) -> Signer {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "bench root");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let key = KeyPair::generate().expect("key");
    let key_pem = key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(p, key).expect("ca");
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    std::fs::write(&cert, ca.pem()).expect("write");
    std::fs::write(&key, key_pem).expect("write");
    let td = trust_domain_for(&cluster(0), None).expect("td");
    Signer::load(&cert, &key, None, &td, TtlLimits::default()).expect("signer")
}

fn cluster(i: usize) -> ClusterId {
    ClusterId::new(&format!("cluster-{i}")).expect("cluster id")
}

/// Pod `p` of node `n` of cluster `c`, with its own service account.
fn pod(c: usize, n: usize, p: usize) -> Object {
    Object::Pod(
        Pod::from_api(
            &cluster(c),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("pod-{n}-{p}"), "namespace": "bench", "uid": format!("{c}-{n}-{p}")},
                "spec": {"nodeName": format!("node-{n}"), "serviceAccountName": format!("sa-{p}"), "containers": []},
                "status": {"phase": "Running"}}))
            .expect("pod"),
        )
        .expect("valid"),
    )
}

/// An authoriser of cluster-0 on a ready replica of every cluster's pods.
fn authorizer() -> Authorizer {
    let mut view = View::new("bench", 10);
    view.apply(Change {
        upserts: (0..CLUSTERS)
            .flat_map(|c| {
                (0..NODES).flat_map(move |n| (0..PODS_PER_NODE).map(move |p| pod(c, n, p)))
            })
            .collect(),
        clusters: (0..CLUSTERS)
            .map(|c| pb::ClusterStatus {
                cluster: cluster(c).to_string(),
                synced: true,
                connected: true,
                ..Default::default()
            })
            .collect(),
        ..Change::default()
    });
    let mut replica = Replica::new();
    for part in view.snapshot(&Scope::AllClusters, 1 << 20) {
        replica.apply(part).expect("part");
    }
    assert!(replica.ready());
    Authorizer::new(
        cluster(0),
        trust_domain_for(&cluster(0), None).expect("td"),
        Arc::new(RwLock::new(replica)),
    )
}

/// Runs `op` for about `budget`; the rate per second.
fn rate(budget: Duration, mut op: impl FnMut(usize)) -> f64 {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < budget {
        for _ in 0..64 {
            op(n);
            n += 1;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// How long the identity manager of a node takes to obtain certificates for 100 new pods
/// (each its own service account) from a CA of cluster-0 served over TLS on loopback.
fn hundred_new_pods() -> Duration {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = pki::Pki::new(dir.path(), "bench");
        let tracker = weft::tracker::server::Tracker::new(View::new("bench", 10), 1 << 20);
        tracker.apply(Change {
            upserts: (0..PODS_PER_NODE).map(|p| pod(0, 0, p)).collect(),
            clusters: vec![pb::ClusterStatus {
                cluster: cluster(0).to_string(),
                synced: true,
                connected: true,
                ..Default::default()
            }],
            ..Change::default()
        });
        let view = Arc::new(RwLock::new(Replica::new()));
        tokio::spawn(weft::tracker::client::follow(
            tracking::serve(&tracker).await,
            pb::SubscribeRequest {
                cluster: cluster(0).to_string(),
                ..Default::default()
            },
            view.clone(),
            Duration::from_millis(50),
        ));
        tracking::wait_for(&view, "the CA's view", Replica::ready).await;
        let td = trust_domain_for(&cluster(0), None).expect("td");
        let signer = Signer::load(
            &root.ca_file(),
            &root.ca_key_file(),
            None,
            &td,
            TtlLimits::default(),
        )
        .expect("signer");
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "bench-token-0123456789 node-0\n").expect("write");
        let serving = root.issue("serving", "spiffe://cluster-0/weft/ca");
        let identity =
            weft::tracker::tls::ServingFiles::load(&serving.cert, &serving.key).expect("identity");
        let ca = weft::ca::Ca::new(
            signer,
            Arc::new(weft::ca::BootstrapTokens::load(&tokens).expect("tokens")),
            Authorizer::new(cluster(0), td, view),
        );
        let url = tracking::serve_ca(ca, identity).await;
        let channel = weft::ca::client::connect(
            &url,
            tonic::transport::Certificate::from_pem(std::fs::read(root.ca_file()).expect("root")),
        )
        .await
        .expect("connect");
        let authority = weft::ca::client::RemoteCa::new(
            channel,
            weft::ca::client::Token::Fixed("bench-token-0123456789".into()),
        );
        let manager = weft::identity::manager::IdentityManager::new(
            Arc::new(authority),
            weft::identity::manager::Renewal::default(),
        );
        let ids: BTreeSet<WorkloadId> = (0..PODS_PER_NODE)
            .map(|p| {
                WorkloadId::parse(&format!("spiffe://cluster-0/ns/bench/sa/sa-{p}")).expect("id")
            })
            .collect();
        let start = Instant::now();
        manager.set_identities(&ids);
        while !ids.iter().all(|id| manager.certificate(id).is_some()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let took = start.elapsed();
        assert!(manager.status().iter().all(|s| s.failures == 0));
        took
    })
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let signer = signer(dir.path());
    let id = WorkloadId::parse("spiffe://cluster-0/ns/bench/sa/sa-7").expect("id");
    // The nodes' side, made once: the CA's work is what is measured.
    let csrs: Vec<String> = (0..256)
        .map(|_| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::default();
            p.distinguished_name = DistinguishedName::new();
            p.serialize_request(&key).expect("csr").pem().expect("pem")
        })
        .collect();
    let ttl = Duration::from_secs(3600);
    let signatures = rate(Duration::from_secs(3), |i| {
        let issued = signer
            .sign(csrs[i % csrs.len()].as_bytes(), &id, ttl)
            .expect("signed");
        std::hint::black_box(issued);
    });

    let t = Instant::now();
    let authz = authorizer();
    let built = t.elapsed();
    let (mut granted, mut asked) = (0u64, 0u64);
    let authorisations = rate(Duration::from_secs(2), |i| {
        let node = format!("node-{}", i % NODES);
        let id = WorkloadId::parse(&format!(
            "spiffe://cluster-0/ns/bench/sa/sa-{}",
            i % (PODS_PER_NODE * 2)
        ))
        .expect("id");
        asked += 1;
        granted += u64::from(authz.authorize(&node, &id).is_ok());
    });

    let hundred = hundred_new_pods();

    println!("weft CA, one thread:");
    println!(
        "  signatures (P-256 CA, P-256 CSRs, verify + build + sign + PEM): {signatures:.0}/s ({:.0} us each)",
        1e6 / signatures
    );
    println!(
        "  authorisation on a view of {} pods ({CLUSTERS} clusters x {NODES} nodes x {PODS_PER_NODE}): {authorisations:.0}/s ({:.2} us each, id parse included; {granted} of {asked} granted); view built in {built:.2?}",
        CLUSTERS * NODES * PODS_PER_NODE,
        1e6 / authorisations
    );
    println!(
        "  a node's certificates for {PODS_PER_NODE} new pods (keys, CSRs, a CA over TLS on loopback): {hundred:.2?}"
    );
    println!("  target: >= 5,000 signatures/s on one core");

    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3));
    let mut i = 0;
    c.bench_function("sign a P-256 CSR", |b| {
        b.iter(|| {
            i += 1;
            signer
                .sign(csrs[i % csrs.len()].as_bytes(), &id, ttl)
                .expect("signed")
        })
    });
    c.bench_function("authorise on 100k pods", |b| {
        b.iter(|| authz.authorize("node-42", &id).is_ok())
    });
    c.final_summary();
}
