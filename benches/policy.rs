//! Policy engine benchmark at clusterset scale: 10 clusters, 100,000 pods, 1,000 namespaces,
//! 10,000 policies in a realistic mix. Prints decisions/s (and the ratio to the plain
//! reference evaluator of the property test), load+compile time, memory, and incremental
//! update times; then criterion measures the same operations.
//!
//! Run: `cargo bench --bench policy` (or `make bench`).

#[path = "../tests/common/reference.rs"]
#[allow(dead_code)]
mod reference;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use serde_json::json;

use criterion::{BatchSize, Criterion};
use weft::model::labels::{self, CLUSTER_LABELS, METADATA_NAME};
use weft::model::{
    Cluster, ClusterId, ClusterSet, ClusterSettings, ContainerPort, IpBlock, LabelSelector, Labels,
    Namespace, NetworkPolicy, Operator, Peer, Pod, PodPhase, PortRule, PortSpec, Protocol,
    Requirement, Rule,
};
use weft::policy::{Connection, Engine};

const CLUSTERS: usize = 10;
const NAMESPACES_PER_CLUSTER: usize = 100;
const PODS_PER_NAMESPACE: usize = 100;
const POLICIES_PER_NAMESPACE: usize = 10;
const PROBES: usize = 10_000;

/// A small deterministic generator (xorshift64*), so every run measures the same set.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn sel(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs).into_iter().collect::<BTreeMap<_, _>>(),
        match_expressions: Vec::new(),
    }
}

fn tcp(start: u16, end: u16) -> PortRule {
    PortRule {
        protocol: Protocol::Tcp,
        port: Some(PortSpec::Range { start, end }),
    }
}

fn pod_ip(c: usize, n: usize, p: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, c as u8, n as u8, p as u8 + 1))
}

/// A policy's pod selector, ingress rules and egress rules.
type PolicySpec = (LabelSelector, Option<Vec<Rule>>, Option<Vec<Rule>>);

/// One namespace's ten policies: a default deny, then allows of every shape.
fn namespace_policies(cid: &ClusterId, c: usize, ns: &str, rng: &mut Rng) -> Vec<NetworkPolicy> {
    let app = |rng: &mut Rng| format!("app-{}", rng.below(10));
    let team = |rng: &mut Rng| format!("team-{}", rng.below(20));
    let other_cluster = |rng: &mut Rng| format!("cluster-{}", rng.below(CLUSTERS));
    let mut specs: Vec<PolicySpec> = vec![
        (LabelSelector::default(), Some(vec![]), None),
        (
            sel(&[("app", app(rng))]),
            Some(vec![Rule {
                ports: vec![tcp(80, 80)],
                peers: vec![Peer::Pods {
                    pod_selector: Some(sel(&[("app", app(rng))])),
                    namespace_selector: None,
                }],
            }]),
            None,
        ),
        (
            sel(&[("tier", "front".into())]),
            Some(vec![Rule {
                ports: vec![PortRule {
                    protocol: Protocol::Tcp,
                    port: Some(PortSpec::Named("http".into())),
                }],
                peers: vec![Peer::Pods {
                    pod_selector: None,
                    namespace_selector: Some(sel(&[("team", team(rng))])),
                }],
            }]),
            None,
        ),
        (
            sel(&[("app", app(rng))]),
            Some(vec![Rule {
                ports: vec![tcp(8000, 8999)],
                peers: vec![Peer::Pods {
                    pod_selector: Some(sel(&[("app", app(rng))])),
                    namespace_selector: Some(sel(&[("env", "prod".into())])),
                }],
            }]),
            None,
        ),
        (
            sel(&[("tier", "db".into())]),
            Some(vec![Rule {
                ports: vec![tcp(5432, 5432)],
                peers: vec![Peer::Pods {
                    pod_selector: Some(sel(&[("tier", "back".into())])),
                    namespace_selector: Some(sel(&[
                        (CLUSTER_LABELS[0], other_cluster(rng)),
                        (
                            METADATA_NAME,
                            format!("ns-{}", rng.below(NAMESPACES_PER_CLUSTER)),
                        ),
                    ])),
                }],
            }]),
            None,
        ),
        (
            LabelSelector::default(),
            Some(vec![Rule {
                ports: vec![],
                peers: vec![Peer::IpBlock(IpBlock {
                    cidr: "172.16.0.0/12".parse().expect("cidr"),
                    except: vec!["172.16.5.0/24".parse().expect("cidr")],
                })],
            }]),
            None,
        ),
        (
            sel(&[("app", app(rng))]),
            None,
            Some(vec![
                Rule {
                    ports: vec![PortRule {
                        protocol: Protocol::Udp,
                        port: Some(PortSpec::Range { start: 53, end: 53 }),
                    }],
                    peers: vec![Peer::Pods {
                        pod_selector: Some(sel(&[("k8s-app", "kube-dns".into())])),
                        namespace_selector: Some(sel(&[(METADATA_NAME, "kube-system".into())])),
                    }],
                },
                Rule {
                    ports: vec![tcp(443, 443), tcp(9000, 9100)],
                    peers: vec![
                        Peer::IpBlock(IpBlock {
                            cidr: "10.0.0.0/8".parse().expect("cidr"),
                            except: vec![format!("10.{c}.0.0/16").parse().expect("cidr")],
                        }),
                        Peer::Pods {
                            pod_selector: None,
                            namespace_selector: Some(sel(&[(
                                CLUSTER_LABELS[1],
                                other_cluster(rng),
                            )])),
                        },
                    ],
                },
            ]),
        ),
        (
            LabelSelector {
                match_labels: BTreeMap::new(),
                match_expressions: vec![Requirement {
                    key: "version".into(),
                    operator: Operator::In,
                    values: ["v1".to_string(), "v2".to_string()].into(),
                }],
            },
            Some(vec![Rule {
                ports: vec![tcp(80, 80), tcp(443, 443)],
                peers: vec![Peer::Pods {
                    pod_selector: Some(LabelSelector {
                        match_labels: BTreeMap::new(),
                        match_expressions: vec![Requirement {
                            key: "tier".into(),
                            operator: Operator::NotIn,
                            values: ["db".to_string()].into(),
                        }],
                    }),
                    namespace_selector: Some(sel(&[("team", team(rng))])),
                }],
            }]),
            None,
        ),
        (
            sel(&[("app", app(rng)), ("tier", "back".into())]),
            Some(vec![Rule {
                ports: vec![tcp(9000, 9100)],
                peers: vec![Peer::Pods {
                    pod_selector: Some(sel(&[("app", app(rng))])),
                    namespace_selector: Some(LabelSelector::default()),
                }],
            }]),
            None,
        ),
        (
            sel(&[("app", app(rng))]),
            Some(vec![Rule {
                ports: vec![],
                peers: vec![Peer::Pods {
                    pod_selector: None,
                    namespace_selector: Some(sel(&[(CLUSTER_LABELS[2], other_cluster(rng))])),
                }],
            }]),
            Some(vec![Rule {
                ports: vec![],
                peers: vec![],
            }]),
        ),
    ];
    assert_eq!(specs.len(), POLICIES_PER_NAMESPACE);
    specs
        .drain(..)
        .enumerate()
        .map(|(i, (pod_selector, ingress, egress))| NetworkPolicy {
            cluster: cid.clone(),
            namespace: ns.to_owned(),
            name: format!("policy-{i}"),
            uid: format!("{cid}-{ns}-policy-{i}"),
            pod_selector,
            ingress,
            egress,
        })
        .collect()
}

fn clusterset(rng: &mut Rng) -> ClusterSet {
    let mut set = ClusterSet::default();
    for c in 0..CLUSTERS {
        let cid = ClusterId::new(&format!("cluster-{c}")).expect("cluster id");
        let mut cluster = Cluster::new(cid.clone(), ClusterSettings::default());
        for n in 0..NAMESPACES_PER_CLUSTER {
            let name = if n == 0 {
                "kube-system".to_owned()
            } else {
                format!("ns-{n}")
            };
            let declared = labels(&[
                ("team", format!("team-{}", rng.below(20))),
                (
                    "env",
                    if rng.below(2) == 0 { "prod" } else { "staging" }.into(),
                ),
            ]);
            let (ns_labels, _) = labels::namespace_labels(&cid, &name, declared);
            cluster.namespaces.insert(
                name.clone(),
                Namespace {
                    cluster: cid.clone(),
                    name: name.clone(),
                    uid: format!("{cid}-ns-{n}"),
                    labels: ns_labels,
                },
            );
            for p in 0..PODS_PER_NAMESPACE {
                let uid = format!("{cid}-{n}-{p}");
                let mut pod_labels = labels(&[
                    ("app", format!("app-{}", rng.below(10))),
                    ("tier", ["front", "back", "db"][rng.below(3)].into()),
                    ("version", format!("v{}", 1 + rng.below(3))),
                ]);
                if n == 0 && p < 5 {
                    pod_labels.insert("k8s-app".into(), "kube-dns".into());
                }
                cluster.pods.insert(
                    uid.clone(),
                    Pod {
                        cluster: cid.clone(),
                        uid,
                        namespace: name.clone(),
                        name: format!("pod-{p}"),
                        labels: pod_labels,
                        phase: PodPhase::Running,
                        ips: vec![pod_ip(c, n, p)],
                        host_network: false,
                        node_name: Some(format!("node-{}", p % 10)),
                        service_account: "default".into(),
                        ports: vec![ContainerPort {
                            name: Some("http".into()),
                            port: 8080,
                            protocol: Protocol::Tcp,
                        }],
                    },
                );
            }
            for pol in namespace_policies(&cid, c, &name, rng) {
                cluster
                    .policies
                    .insert((pol.namespace.clone(), pol.name.clone()), pol);
            }
        }
        set.clusters.insert(cid, cluster);
    }
    set
}

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

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
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
