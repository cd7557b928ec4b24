//! CA benchmark: signatures per second on one core (a P-256 CA signing P-256 CSRs: parse,
//! verify the CSR's signature, build the leaf from the template, sign, PEM), and the cost of
//! authorising a call on a view of 100,000 pods (10 clusters × 100 nodes × 100 pods).
//!
//! Run: `cargo bench --bench ca`.

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
