//! Policy engine benchmark at clusterset scale: 10 clusters, 100,000 pods, 1,000 namespaces,
//! 10,000 policies in a realistic mix. Prints decisions/s (and the ratio to the plain
//! reference evaluator of the property test), load+compile time, memory, and incremental
//! update times; then criterion measures the same operations.
//!
//! Run: `cargo bench --bench policy` (or `make bench`).

#[path = "../tests/common/reference.rs"]
#[allow(dead_code)]
mod reference;

mod common;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::{
    CLUSTERS, NAMESPACES_PER_CLUSTER, PODS_PER_NAMESPACE, Rng, clusterset, pod_ip, rss_bytes,
};
use criterion::{BatchSize, Criterion};
use serde_json::json;
use weft::model::{ClusterSet, LabelSelector, Operator, Peer, PortSpec, Protocol, Rule};
use weft::policy::{Connection, Engine};

const PROBES: usize = 10_000;

fn probes(engine: &Engine, rng: &mut Rng) -> Vec<Connection> {
    const PORTS: [(u16, Protocol); 8] = [
        (80, Protocol::Tcp),
        (443, Protocol::Tcp),
        (5432, Protocol::Tcp),
        (8080, Protocol::Tcp),
        (8500, Protocol::Tcp),
        (9050, Protocol::Tcp),
        (53, Protocol::Udp),
        (22, Protocol::Tcp),
    ];
    (0..PROBES)
        .map(|i| {
            let ip = |rng: &mut Rng| {
                pod_ip(
                    rng.below(CLUSTERS),
                    rng.below(NAMESPACES_PER_CLUSTER),
                    rng.below(PODS_PER_NAMESPACE),
                )
            };
            let src = if i % 20 == 0 {
                engine.address_endpoint(IpAddr::V4(Ipv4Addr::new(172, 16, 5, rng.below(250) as u8)))
            } else {
                engine.address_endpoint(ip(rng))
            };
            let dst = engine.address_endpoint(ip(rng));
            let (port, protocol) = PORTS[rng.below(PORTS.len())];
            Connection {
                src,
                dst,
                port,
                protocol,
            }
        })
        .collect()
}

fn selector_manifest(sel: &LabelSelector) -> serde_json::Value {
    let exprs: Vec<serde_json::Value> = sel
        .match_expressions
        .iter()
        .map(|r| {
            let op = match r.operator {
                Operator::In => "In",
                Operator::NotIn => "NotIn",
                Operator::Exists => "Exists",
                Operator::DoesNotExist => "DoesNotExist",
            };
            json!({"key": r.key, "operator": op, "values": r.values})
        })
        .collect();
    json!({"matchLabels": sel.match_labels, "matchExpressions": exprs})
}

fn rules_manifest(rules: &[Rule], peers_field: &str) -> serde_json::Value {
    let rules: Vec<serde_json::Value> = rules
        .iter()
        .map(|r| {
            let ports: Vec<serde_json::Value> = r
                .ports
                .iter()
                .map(|p| match &p.port {
                    None => json!({"protocol": p.protocol.as_str()}),
                    Some(PortSpec::Range { start, end }) => {
                        json!({"protocol": p.protocol.as_str(), "port": start, "endPort": end})
                    }
                    Some(PortSpec::Named(n)) => json!({"protocol": p.protocol.as_str(), "port": n}),
                })
                .collect();
            let peers: Vec<serde_json::Value> = r
                .peers
                .iter()
                .map(|peer| match peer {
                    Peer::IpBlock(b) => json!({"ipBlock": {
                        "cidr": b.cidr.to_string(),
                        "except": b.except.iter().map(ToString::to_string).collect::<Vec<_>>()
                    }}),
                    Peer::Pods {
                        pod_selector,
                        namespace_selector,
                    } => {
                        let mut m = serde_json::Map::new();
                        if let Some(s) = pod_selector {
                            m.insert("podSelector".into(), selector_manifest(s));
                        }
                        if let Some(s) = namespace_selector {
                            m.insert("namespaceSelector".into(), selector_manifest(s));
                        }
                        serde_json::Value::Object(m)
                    }
                })
                .collect();
            json!({"ports": ports, peers_field: peers})
        })
        .collect();
    serde_json::Value::Array(rules)
}

/// The clusterset as manifests on disk: one multi-document YAML file per namespace.
fn write_manifests(set: &ClusterSet, dir: &std::path::Path) {
    for cluster in set.clusters.values() {
        for ns in cluster.namespaces.values() {
            let mut docs = vec![json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns.name, "uid": ns.uid, "labels": ns.labels}})];
            docs.extend(cluster.pods.values().filter(|p| p.namespace == ns.name).map(|p| {
                json!({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid, "labels": p.labels},
                    "spec": {"nodeName": p.node_name, "containers": [{"name": "app",
                        "ports": [{"name": "http", "containerPort": 8080}]}]},
                    "status": {"phase": "Running",
                        "podIPs": p.ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>()}})
            }));
            docs.extend(
                cluster
                    .policies
                    .values()
                    .filter(|p| p.namespace == ns.name)
                    .map(|p| {
                        let mut types = Vec::new();
                        let mut spec = serde_json::Map::new();
                        spec.insert("podSelector".into(), selector_manifest(&p.pod_selector));
                        if let Some(rules) = &p.ingress {
                            types.push("Ingress");
                            spec.insert("ingress".into(), rules_manifest(rules, "from"));
                        }
                        if let Some(rules) = &p.egress {
                            types.push("Egress");
                            spec.insert("egress".into(), rules_manifest(rules, "to"));
                        }
                        spec.insert("policyTypes".into(), json!(types));
                        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid},
                    "spec": spec})
                    }),
            );
            let text: Vec<String> = docs
                .iter()
                .map(|d| serde_saphyr::to_string(d).expect("YAML"))
                .collect();
            let file = dir
                .join(cluster.id.as_str())
                .join(format!("{}.yaml", ns.name));
            std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
            std::fs::write(file, text.join("---\n")).expect("write");
        }
    }
}

fn per_second(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Times `f` over every probe, repeated until at least `min` has passed.
fn time_decisions(
    min: Duration,
    probes: &[Connection],
    mut f: impl FnMut(&Connection) -> bool,
) -> (usize, Duration) {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < min {
        for p in probes {
            black_box(f(black_box(p)));
        }
        n += probes.len();
    }
    (n, start.elapsed())
}

fn main() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let set = clusterset(&mut rng);
    let rss_before = rss_bytes();
    let t = Instant::now();
    let mut engine = Engine::from_clusterset(&set);
    let compile = t.elapsed();
    let rss_after = rss_bytes();
    let (pods, namespaces, policies) = engine.counts();
    let conns = probes(&engine, &mut rng);

    // The same clusterset read back from YAML, as `weft policy check` and the tracker do.
    let dir = tempfile::tempdir().expect("tempdir");
    write_manifests(&set, dir.path());
    let t = Instant::now();
    let loaded = weft::model::load_clusterset(dir.path()).expect("the manifests load");
    let load = t.elapsed();
    let reloaded = Engine::from_clusterset(&loaded.clusterset);
    let load_and_compile = t.elapsed();
    assert_eq!(
        reloaded.counts(),
        engine.counts(),
        "the manifests hold the whole clusterset"
    );
    drop((reloaded, loaded, dir));

    let (n, d) = time_decisions(Duration::from_secs(2), &conns, |c| {
        engine.decide(c).verdict() == weft::policy::Verdict::Allow
    });
    let engine_rate = per_second(n, d);
    let allowed = conns
        .iter()
        .filter(|c| engine.decide(c).verdict() == weft::policy::Verdict::Allow)
        .count();

    // What one node's proxy sees: destinations among the ~100 pods of one node, sources
    // anywhere in the clusterset.
    let node_pods: Vec<IpAddr> = (0..10)
        .flat_map(|n| {
            (0..PODS_PER_NAMESPACE)
                .step_by(10)
                .map(move |p| pod_ip(0, n, p))
        })
        .collect();
    let local: Vec<Connection> = conns
        .iter()
        .enumerate()
        .map(|(i, c)| Connection {
            dst: engine.address_endpoint(node_pods[i % node_pods.len()]),
            ..*c
        })
        .collect();
    let (ln, ld) = time_decisions(Duration::from_secs(2), &local, |c| {
        engine.decide(c).verdict() == weft::policy::Verdict::Allow
    });
    let local_rate = per_second(ln, ld);

    let sample = &conns[..200];
    let (rn, rd) = time_decisions(Duration::from_secs(2), sample, |c| {
        let (src, dst) = (
            reference::End::Ip(c.src.ip()),
            reference::End::Ip(c.dst.ip()),
        );
        reference::evaluate(&set, &src, &dst, c.port, c.protocol, false)
            .is_ok_and(|e| e.verdict == weft::policy::Verdict::Allow)
    });
    let reference_rate = per_second(rn, rd);

    // Incremental updates, each undone so the next measures the same state.
    let pod = set.pods().nth(12_345).expect("pod").clone();
    let mut relabelled = pod.clone();
    relabelled.labels.insert("app".into(), "app-3".into());
    let t = Instant::now();
    engine.upsert_pod(&relabelled);
    let pod_update = t.elapsed();
    engine.upsert_pod(&pod);

    let ns = set.namespaces().nth(345).expect("namespace").clone();
    let mut ns2 = ns.clone();
    ns2.labels.insert("team".into(), "team-99".into());
    let t = Instant::now();
    engine.upsert_namespace(&ns2);
    let ns_update = t.elapsed();
    engine.upsert_namespace(&ns);

    let mut new_policy = set.policies().nth(4_321).expect("policy").clone();
    new_policy.name = "added".into();
    let t = Instant::now();
    engine.upsert_policy(&new_policy);
    let policy_add = t.elapsed();
    engine.remove_policy(&new_policy.cluster, &new_policy.namespace, "added");

    println!("weft policy engine, one thread:");
    println!(
        "  clusterset: {CLUSTERS} clusters, {pods} pods, {namespaces} namespaces, {policies} policies"
    );
    println!(
        "  load+compile from YAML manifests: {load_and_compile:.2?} (load {load:.2?}); compile alone (Engine::from_clusterset): {compile:.2?}"
    );
    println!(
        "  memory (RSS growth while compiling): {:.1} MiB",
        (rss_after.saturating_sub(rss_before)) as f64 / (1024.0 * 1024.0)
    );
    println!(
        "  decisions: {engine_rate:.0}/s ({:.0} ns each; {allowed} of {PROBES} probes allowed)",
        1e9 / engine_rate
    );
    println!(
        "  decisions, destinations on one node ({} pods): {local_rate:.0}/s ({:.0} ns each)",
        node_pods.len(),
        1e9 / local_rate
    );
    println!(
        "  baseline, plain reference evaluator: {reference_rate:.0}/s -> engine is {:.0}x faster",
        engine_rate / reference_rate
    );
    println!(
        "  incremental update: pod labels {pod_update:.2?}, namespace labels {ns_update:.2?}, policy added {policy_add:.2?}"
    );
    println!("  targets: >= 10,000,000 decisions/s, pod update <= 1 ms, namespace update <= 50 ms");

    let mut c = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3));
    c.bench_function("decide (10k probes)", |b| {
        b.iter(|| {
            conns
                .iter()
                .filter(|c| engine.decide(c).verdict() == weft::policy::Verdict::Allow)
                .count()
        })
    });
    c.bench_function("decide (10k probes, destinations on one node)", |b| {
        b.iter(|| {
            local
                .iter()
                .filter(|c| engine.decide(c).verdict() == weft::policy::Verdict::Allow)
                .count()
        })
    });
    c.bench_function("pod relabel", |b| {
        b.iter_batched(
            || (),
            |()| {
                engine.upsert_pod(&relabelled);
                engine.upsert_pod(&pod);
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("namespace relabel", |b| {
        b.iter(|| {
            engine.upsert_namespace(&ns2);
            engine.upsert_namespace(&ns);
        })
    });
    c.final_summary();
}
