//! Property test: on random clustersets and probes, the indexed engine explains every decision
//! exactly as the plain reference evaluator does, both when built from the clusterset at once
//! and after random incremental updates (which must also agree with a fresh engine).

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use common::reference::{self, End};
use common::{Fixture, cid};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use serde_json::{Map, Value, json};
use weft::model::{ClusterSet, Namespace, Protocol};
use weft::policy::{Connection, Engine};

const CLUSTERS: [&str; 3] = ["c1", "c2", "c3"];
const NAMESPACES: [&str; 2] = ["x", "y"];
/// Namespace names selectors may ask for (`z` never exists).
const NS_NAMES: [&str; 3] = ["x", "y", "z"];

type Vocabulary = &'static [(&'static str, &'static [&'static str])];

/// Pod label keys and values.
const POD_LABELS: Vocabulary = &[
    ("app", &["web", "db"]),
    ("tier", &["front", "back"]),
    ("role", &["a", "b"]),
];

/// Namespace label keys and values, with the automatic ones.
const NS_LABELS: Vocabulary = &[
    ("env", &["prod", "dev"]),
    ("team", &["a", "b"]),
    ("cluster.clusterset.k8s.io", &CLUSTERS),
    ("clusterset.k8s.io/cluster-name", &CLUSTERS),
    ("networking.k8s.io/multicluster-name", &CLUSTERS),
    ("kubernetes.io/metadata.name", &NS_NAMES),
];

/// Valid ipBlocks: (cidr, except). Pod addresses are 10.0.<cluster>.<n> and fd00::<cluster>:<n>,
/// nodes 192.168.<cluster>.1 and fd99:<cluster>::1 (clusters from 1).
const BLOCKS: &[(&str, &[&str])] = &[
    ("10.0.0.0/8", &[]),
    ("10.0.0.0/16", &["10.0.2.0/24", "10.0.1.128/25"]),
    ("10.0.1.0/24", &["10.0.1.2/32"]),
    ("10.0.2.3/32", &[]),
    ("0.0.0.0/0", &["10.0.0.0/8"]),
    ("0.0.0.0/0", &[]),
    ("192.168.0.0/16", &["192.168.2.0/24"]),
    ("::/0", &[]),
    ("::/0", &["fd00::/16"]),
    ("fd00::/16", &["fd00::1:0/112"]),
    ("fd00::2:1/128", &[]),
    ("fd99::/16", &[]),
];

/// `policyTypes`: absent, empty, or a list.
const POLICY_TYPES: &[Option<&[&str]>] = &[
    None,
    Some(&[]),
    Some(&["Ingress"]),
    Some(&["Egress"]),
    Some(&["Ingress", "Egress"]),
];

/// Addresses probed directly, besides pods' own.
const ADDRESSES: &[&str] = &[
    "10.0.1.1",
    "10.0.2.2",
    "192.168.1.1",
    "192.168.2.1",
    "8.8.8.8",
    "fd00::1:1",
    "fd00::3:2",
    "fd99:1::1",
    "2001:db8::1",
    "::ffff:10.0.1.1",
    "::ffff:192.168.3.1",
];

fn labels(vocab: Vocabulary) -> impl Strategy<Value = Value> {
    prop::collection::vec((0..vocab.len(), any::<Index>()), 0..2).prop_map(move |pairs| {
        let map: Map<String, Value> = pairs
            .into_iter()
            .map(|(k, v)| (vocab[k].0.to_owned(), json!(v.get(vocab[k].1))))
            .collect();
        Value::Object(map)
    })
}

fn selector(vocab: Vocabulary) -> impl Strategy<Value = Value> {
    let expression = (
        0..vocab.len(),
        select(vec!["In", "NotIn", "Exists", "DoesNotExist"]),
        prop::collection::vec(any::<Index>(), 1..3),
    )
        .prop_map(move |(k, op, values)| {
            let (key, vals) = vocab[k];
            if matches!(op, "In" | "NotIn") {
                let values: Vec<&str> = values.iter().map(|i| *i.get(vals)).collect();
                json!({"key": key, "operator": op, "values": values})
            } else {
                json!({"key": key, "operator": op})
            }
        });
    (labels(vocab), prop::collection::vec(expression, 0..2)).prop_map(|(match_labels, exprs)| {
        let mut sel = Map::new();
        if match_labels.as_object().is_some_and(|m| !m.is_empty()) {
            sel.insert("matchLabels".into(), match_labels);
        }
        if !exprs.is_empty() {
            sel.insert("matchExpressions".into(), Value::Array(exprs));
        }
        Value::Object(sel)
    })
}

fn protocol() -> impl Strategy<Value = Protocol> {
    select(vec![Protocol::Tcp, Protocol::Udp, Protocol::Sctp])
}

fn port_entry() -> impl Strategy<Value = Value> {
    let proto = prop::option::of(protocol());
    let port = prop_oneof![
        Just(json!(null)),
        select(vec![80u16, 81, 53, 8080, 9090]).prop_map(|p| json!(p)),
        (
            select(vec![80u16, 1000, 8000]),
            select(vec![0u16, 1, 100, 2000])
        )
            .prop_map(|(p, len)| json!([p, p + len])),
        select(vec!["http", "metrics", "dns", "serve"]).prop_map(|n| json!(n)),
    ];
    (proto, port).prop_map(|(proto, port)| {
        let mut e = Map::new();
        if let Some(p) = proto {
            e.insert("protocol".into(), json!(p.as_str()));
        }
        match port {
            Value::Null => {}
            Value::Array(range) => {
                e.insert("port".into(), range[0].clone());
                e.insert("endPort".into(), range[1].clone());
            }
            p => {
                e.insert("port".into(), p);
            }
        }
        Value::Object(e)
    })
}

fn peer() -> impl Strategy<Value = Value> {
    prop_oneof![
        selector(POD_LABELS).prop_map(|p| json!({"podSelector": p})),
        selector(NS_LABELS).prop_map(|n| json!({"namespaceSelector": n})),
        (selector(POD_LABELS), selector(NS_LABELS))
            .prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
        select(BLOCKS)
            .prop_map(|(cidr, except)| json!({"ipBlock": {"cidr": cidr, "except": except}})),
    ]
}

/// A rule as (ports, peers); the peers' field name depends on the direction.
fn rule() -> impl Strategy<Value = (Vec<Value>, Vec<Value>)> {
    (
        prop::collection::vec(port_entry(), 0..3),
        prop::collection::vec(peer(), 0..3),
    )
}

fn rules(peers_field: &'static str) -> impl Strategy<Value = Option<Value>> {
    prop::option::weighted(0.7, prop::collection::vec(rule(), 0..3)).prop_map(move |rules| {
        rules.map(|rs| {
            Value::Array(
                rs.into_iter()
                    .map(|(ports, peers)| {
                        let mut r = Map::new();
                        if !ports.is_empty() {
                            r.insert("ports".into(), Value::Array(ports));
                        }
                        if !peers.is_empty() {
                            r.insert(peers_field.into(), Value::Array(peers));
                        }
                        Value::Object(r)
                    })
                    .collect(),
            )
        })
    })
}

#[derive(Debug, Clone)]
struct PolicyGen {
    cluster: usize,
    ns: usize,
    name: usize,
    spec: Value,
}

fn policy_gen() -> impl Strategy<Value = PolicyGen> {
    let types = select(POLICY_TYPES);
    (
        0..3usize,
        0..2usize,
        0..3usize,
        selector(POD_LABELS),
        types,
        rules("from"),
        rules("to"),
    )
        .prop_map(
            |(cluster, ns, name, pod_selector, types, ingress, egress)| {
                let mut spec = Map::new();
                spec.insert("podSelector".into(), pod_selector);
                if let Some(t) = types {
                    spec.insert("policyTypes".into(), json!(t));
                }
                if let Some(i) = ingress {
                    spec.insert("ingress".into(), i);
                }
                if let Some(e) = egress {
                    spec.insert("egress".into(), e);
                }
                PolicyGen {
                    cluster,
                    ns,
                    name,
                    spec: Value::Object(spec),
                }
            },
        )
}

#[derive(Debug, Clone)]
struct PodGen {
    cluster: usize,
    ns: usize,
    labels: Value,
    phase: &'static str,
    v4: bool,
    v6: bool,
    host_network: bool,
    /// Take the addresses of another pod.
    duplicate_of: Option<Index>,
    /// (name, port, protocol) of the main containers' ports, split over two containers.
    ports: Vec<(Option<&'static str>, u16, Protocol)>,
    /// Ports of a restartable (sidecar) init container.
    sidecar: Vec<(Option<&'static str>, u16, Protocol)>,
}

fn container_port() -> impl Strategy<Value = (Option<&'static str>, u16, Protocol)> {
    (
        select(vec![None, Some("http"), Some("metrics"), Some("dns")]),
        select(vec![80u16, 81, 53, 1000, 8080, 9090]),
        protocol(),
    )
}

fn pod_gen() -> impl Strategy<Value = PodGen> {
    (
        (0..3usize, 0..2usize, labels(POD_LABELS)),
        select(vec![
            "Running",
            "Running",
            "Running",
            "Pending",
            "Succeeded",
        ]),
        (
            prop::bool::weighted(0.9),
            prop::bool::weighted(0.5),
            prop::bool::weighted(0.12),
        ),
        prop::option::weighted(0.15, any::<Index>()),
        prop::collection::vec(container_port(), 0..4),
        prop::collection::vec(container_port(), 0..2),
    )
        .prop_map(
            |(
                (cluster, ns, labels),
                phase,
                (v4, v6, host_network),
                duplicate_of,
                ports,
                sidecar,
            )| PodGen {
                cluster,
                ns,
                labels,
                phase,
                v4,
                v6,
                host_network,
                duplicate_of,
                ports,
                sidecar,
            },
        )
}

#[derive(Debug, Clone)]
struct NsGen {
    cluster: usize,
    ns: usize,
    labels: Value,
}

fn ns_gen() -> impl Strategy<Value = NsGen> {
    (0..3usize, 0..2usize, labels(NS_LABELS)).prop_map(|(cluster, ns, labels)| NsGen {
        cluster,
        ns,
        labels,
    })
}

#[derive(Debug, Clone)]
enum EndGen {
    /// A pod of the set, on its address of the probe's family.
    Pod(Index),
    /// The address of a pod of the set (of either family).
    PodAddress(Index, bool),
    /// One of [`ADDRESSES`].
    Address(&'static str),
}

fn end_gen() -> impl Strategy<Value = EndGen> {
    prop_oneof![
        6 => any::<Index>().prop_map(EndGen::Pod),
        2 => (any::<Index>(), any::<bool>()).prop_map(|(i, v6)| EndGen::PodAddress(i, v6)),
        2 => select(ADDRESSES).prop_map(EndGen::Address),
    ]
}

#[derive(Debug, Clone)]
struct ProbeGen {
    from: EndGen,
    to: EndGen,
    port: u16,
    protocol: Protocol,
    v6: bool,
}

fn probe_gen() -> impl Strategy<Value = ProbeGen> {
    (
        end_gen(),
        end_gen(),
        select(vec![80u16, 81, 53, 1000, 1001, 3000, 8080, 9090, 443]),
        protocol(),
        prop::bool::weighted(0.3),
    )
        .prop_map(|(from, to, port, protocol, v6)| ProbeGen {
            from,
            to,
            port,
            protocol,
            v6,
        })
}

#[derive(Debug, Clone)]
enum Update {
    RelabelPod(Index, Value),
    RelabelNamespace(NsGen),
    RemoveNamespace(usize, usize),
    AddPolicy(PolicyGen),
    RemovePolicy(Index),
    AddPod(PodGen),
    RemovePod(Index),
    /// A pod's phase changes (a finished pod frees its addresses).
    SetPhase(Index, &'static str),
}

fn update() -> impl Strategy<Value = Update> {
    prop_oneof![
        2 => (any::<Index>(), labels(POD_LABELS)).prop_map(|(i, l)| Update::RelabelPod(i, l)),
        2 => ns_gen().prop_map(Update::RelabelNamespace),
        2 => (0..3usize, 0..2usize).prop_map(|(c, n)| Update::RemoveNamespace(c, n)),
        2 => policy_gen().prop_map(Update::AddPolicy),
        1 => any::<Index>().prop_map(Update::RemovePolicy),
        1 => pod_gen().prop_map(Update::AddPod),
        1 => any::<Index>().prop_map(Update::RemovePod),
        1 => (any::<Index>(), select(vec!["Running", "Succeeded", "Failed", "Pending"]))
            .prop_map(|(i, phase)| Update::SetPhase(i, phase)),
    ]
}

#[derive(Debug, Clone)]
struct World {
    clusters: usize,
    namespaces: Vec<NsGen>,
    pods: Vec<PodGen>,
    policies: Vec<PolicyGen>,
    /// Seed of the order in which the objects are first applied.
    order: u64,
    /// Whether namespaces only named by pods and policies stay out of the clusterset.
    leave_implied_out: bool,
    probes: Vec<ProbeGen>,
    updates: Vec<Update>,
}

fn world() -> impl Strategy<Value = World> {
    (
        2..=3usize,
        prop::collection::vec(ns_gen(), 1..7),
        prop::collection::vec(pod_gen(), 2..14),
        prop::collection::vec(policy_gen(), 0..=6),
        (any::<u64>(), any::<bool>()),
        prop::collection::vec(probe_gen(), 1..40),
        prop::collection::vec(update(), 0..10),
    )
        .prop_map(
            |(
                clusters,
                namespaces,
                pods,
                policies,
                (order, leave_implied_out),
                probes,
                updates,
            )| World {
                clusters,
                namespaces,
                pods,
                policies,
                order,
                leave_implied_out,
                probes,
                updates,
            },
        )
}

/// Builds manifests from the generated descriptions.
struct Builder {
    clusters: usize,
    /// Addresses of the pods made so far, for duplicates.
    addresses: Vec<Vec<String>>,
}

impl Builder {
    fn cluster(&self, c: usize) -> (usize, &'static str) {
        let c = c % self.clusters;
        (c + 1, CLUSTERS[c])
    }

    fn namespace(&self, g: &NsGen) -> (&'static str, Value) {
        let (_, c) = self.cluster(g.cluster);
        let m = json!({"kind": "Namespace", "metadata": {"name": NAMESPACES[g.ns], "labels": g.labels}});
        (c, m)
    }

    fn policy(&self, g: &PolicyGen) -> (&'static str, Value) {
        let (_, c) = self.cluster(g.cluster);
        (
            c,
            common::policy(NAMESPACES[g.ns], &format!("np{}", g.name), g.spec.clone()),
        )
    }

    fn pod(&mut self, g: &PodGen) -> (&'static str, Value) {
        let (k, c) = self.cluster(g.cluster);
        let n = self.addresses.len() + 1;
        let name = format!("p{n}");
        let mut ips = Vec::new();
        if g.host_network {
            // Host-network pods report their node's address, or none yet.
            if g.v4 {
                ips.push(format!("192.168.{k}.1"));
            }
        } else if let Some(i) = g.duplicate_of.filter(|_| !self.addresses.is_empty()) {
            ips = self.addresses[i.index(self.addresses.len())].clone();
        } else {
            if g.v4 {
                ips.push(format!("10.0.{k}.{n}"));
            }
            if g.v6 {
                ips.push(format!("fd00::{k}:{n}"));
            }
        }
        self.addresses.push(ips.clone());
        let ports = |ps: &[(Option<&str>, u16, Protocol)]| -> Vec<Value> {
            ps.iter()
                .map(|(name, port, proto)| {
                    let mut p = json!({"containerPort": port, "protocol": proto.as_str()});
                    if let Some(n) = name {
                        p["name"] = json!(n);
                    }
                    p
                })
                .collect()
        };
        let half = g.ports.len() / 2;
        let mut init = vec![
            json!({"name": "setup", "image": "i", "ports": [{"name": "serve", "containerPort": 7000}]}),
        ];
        if !g.sidecar.is_empty() {
            init.push(json!({"name": "sidecar", "image": "i", "restartPolicy": "Always", "ports": ports(&g.sidecar)}));
        }
        let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        let m = json!({
            "kind": "Pod",
            "metadata": {"namespace": NAMESPACES[g.ns], "name": name, "uid": format!("uid-{name}"), "labels": g.labels},
            "spec": {
                "hostNetwork": g.host_network,
                "nodeName": "n1",
                "initContainers": init,
                "containers": [
                    {"name": "one", "image": "i", "ports": ports(&g.ports[..half])},
                    {"name": "two", "image": "i", "ports": ports(&g.ports[half..])}
                ]
            },
            "status": {"phase": g.phase, "podIPs": pod_ips}
        });
        (c, m)
    }
}

/// Shuffles `v` deterministically from `seed` (xorshift).
fn shuffle<T>(v: &mut [T], mut seed: u64) {
    seed |= 1;
    for i in (1..v.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

/// The reference's name for a generated end, or `None` when it names a pod and there is none.
fn ends(set: &ClusterSet, g: &EndGen) -> Option<End> {
    let pods: Vec<_> = set.pods().collect();
    match g {
        EndGen::Address(a) => Some(End::Ip(a.parse().unwrap())),
        _ if pods.is_empty() => None,
        EndGen::Pod(i) => {
            let p = pods[i.index(pods.len())];
            Some(End::Pod {
                cluster: p.cluster.clone(),
                uid: p.uid.clone(),
            })
        }
        EndGen::PodAddress(i, v6) => {
            let p = pods[i.index(pods.len())];
            p.ip(*v6).or_else(|| p.ips.first().copied()).map(End::Ip)
        }
    }
}

fn engine_endpoint(
    engine: &Engine,
    set: &ClusterSet,
    end: &End,
    v6: bool,
) -> Result<Option<weft::policy::Endpoint>, TestCaseError> {
    match end {
        End::Ip(ip) => Ok(Some(engine.address_endpoint(*ip))),
        End::Pod { cluster, uid } => {
            let pod = reference::find_pod(set, cluster, uid).expect("a pod of the set");
            let id = engine.pod_by_name(cluster.as_str(), &pod.namespace, &pod.name);
            prop_assert!(
                id.is_some(),
                "engine lost pod {}/{}/{}",
                cluster,
                pod.namespace,
                pod.name
            );
            let got = engine.pod_endpoint(id.unwrap(), v6);
            let want = reference::pod_address(set, cluster, uid, v6);
            match (&got, &want) {
                (Ok(e), Ok(ip)) => prop_assert_eq!(e.ip(), *ip, "address of {}", pod.name),
                (Err(_), Err(_)) => {}
                _ => prop_assert!(
                    false,
                    "pod {}: engine {:?}, reference {:?}",
                    pod.name,
                    got,
                    want
                ),
            }
            Ok(got.ok())
        }
    }
}

/// Every probe, explained by `engine` and by the reference on `set`, must be identical.
fn compare(
    engine: &Engine,
    set: &ClusterSet,
    probes: &[ProbeGen],
    when: &str,
) -> Result<(), TestCaseError> {
    for p in probes {
        let (Some(from), Some(to)) = (ends(set, &p.from), ends(set, &p.to)) else {
            continue;
        };
        let src = engine_endpoint(engine, set, &from, p.v6)?;
        let dst = engine_endpoint(engine, set, &to, p.v6)?;
        let want = reference::evaluate(set, &from, &to, p.port, p.protocol, p.v6);
        let (Some(src), Some(dst)) = (src, dst) else {
            prop_assert!(
                want.is_err(),
                "{when}: engine refused {from:?} -> {to:?}, reference did not"
            );
            continue;
        };
        let want =
            want.map_err(|e| TestCaseError::fail(format!("{when}: reference refused: {e}")))?;
        let c = Connection {
            src,
            dst,
            port: p.port,
            protocol: p.protocol,
        };
        let got = engine.explain(&c, &engine.decide(&c));
        prop_assert_eq!(
            got,
            want,
            "{}: {:?} -> {:?} on {}/{} (v6: {})",
            when,
            from,
            to,
            p.port,
            p.protocol,
            p.v6
        );
    }
    Ok(())
}

fn apply_update(f: &mut Fixture, b: &mut Builder, u: &Update) {
    match u {
        Update::RelabelPod(i, labels) => {
            let pods: Vec<_> = f.set.pods().cloned().collect();
            if pods.is_empty() {
                return;
            }
            let mut pod = pods[i.index(pods.len())].clone();
            pod.labels = serde_json::from_value(labels.clone()).unwrap();
            f.upsert_pod(pod);
        }
        Update::RelabelNamespace(g) => {
            let (c, m) = b.namespace(g);
            let api = serde_json::from_value(m).unwrap();
            let (ns, _) = Namespace::from_api(&cid(c), &api).unwrap();
            f.upsert_namespace(ns);
        }
        Update::RemoveNamespace(c, n) => {
            let (_, c) = b.cluster(*c);
            f.remove_namespace(c, NAMESPACES[*n]);
        }
        Update::AddPolicy(g) => {
            let (c, m) = b.policy(g);
            f.apply(c, m);
        }
        Update::RemovePolicy(i) => {
            let keys: Vec<_> = f
                .set
                .policies()
                .map(|p| (p.cluster.to_string(), p.namespace.clone(), p.name.clone()))
                .collect();
            if !keys.is_empty() {
                let (c, ns, name) = &keys[i.index(keys.len())];
                f.remove_policy(c, ns, name);
            }
        }
        Update::AddPod(g) => {
            let (c, m) = b.pod(g);
            f.apply(c, m);
        }
        Update::SetPhase(i, phase) => {
            let pods: Vec<_> = f.set.pods().cloned().collect();
            if pods.is_empty() {
                return;
            }
            let mut pod = pods[i.index(pods.len())].clone();
            pod.phase = phase.parse().unwrap();
            f.upsert_pod(pod);
        }
        Update::RemovePod(i) => {
            let keys: Vec<_> = f
                .set
                .pods()
                .map(|p| (p.cluster.to_string(), p.uid.clone()))
                .collect();
            if !keys.is_empty() {
                let (c, uid) = &keys[i.index(keys.len())];
                f.remove_pod_uid(c, uid);
            }
        }
    }
}

/// Every object survives the tracker's wire unchanged: what a node receives is what the
/// tracker holds.
fn wire_round_trip(set: &weft::model::ClusterSet) -> Result<(), TestCaseError> {
    use weft::tracker::wire::{Object, cluster_objects, pb};
    let objects = set.clusters.values().flat_map(cluster_objects);
    for o in objects {
        let back = Object::try_from(pb::Object::from(&o));
        prop_assert_eq!(back.as_ref(), Ok(&o), "{:?}", o.key());
    }
    Ok(())
}

fn run(w: &World) -> Result<(), TestCaseError> {
    let mut b = Builder {
        clusters: w.clusters,
        addresses: Vec::new(),
    };
    let mut f = Fixture {
        leave_implied_out: w.leave_implied_out,
        ..Fixture::new()
    };
    for k in 1..=w.clusters {
        f.apply(
            CLUSTERS[k - 1],
            common::node("n1", &[&format!("192.168.{k}.1"), &format!("fd99:{k}::1")]),
        );
    }
    let mut objects: Vec<(&str, Value)> = Vec::new();
    objects.extend(w.namespaces.iter().map(|g| b.namespace(g)));
    objects.extend(w.pods.iter().map(|g| b.pod(g)));
    objects.extend(w.policies.iter().map(|g| b.policy(g)));
    shuffle(&mut objects, w.order);
    for (c, m) in objects {
        f.apply(c, m);
    }
    let fresh = Engine::from_clusterset(&f.set);
    compare(&fresh, &f.set, &w.probes, "fresh engine")?;
    wire_round_trip(&f.set)?;
    compare(
        &f.engine,
        &f.set,
        &w.probes,
        "engine built one object at a time",
    )?;
    for (i, u) in w.updates.iter().enumerate() {
        apply_update(&mut f, &mut b, u);
        let when = format!("after update {i} ({u:?})");
        compare(&f.engine, &f.set, &w.probes, &when)?;
        let fresh = Engine::from_clusterset(&f.set);
        compare(&fresh, &f.set, &w.probes, &format!("fresh, {when}"))?;
    }
    Ok(())
}

proptest! {
    // 256 cases by default; PROPTEST_CASES=N for a longer run.
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn engine_explains_every_probe_as_the_reference_evaluator(w in world()) {
        run(&w)?;
    }
}

/// The generators reach the cases that matter: checked once on a fixed sample, so that a
/// generator change that stops producing them is noticed.
#[test]
fn generated_worlds_reach_every_reason_duplicate_addresses_and_host_network_pods() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..256 {
        let w = world().new_tree(&mut runner).unwrap().current();
        let mut b = Builder {
            clusters: w.clusters,
            addresses: Vec::new(),
        };
        let mut f = Fixture::new();
        for (c, m) in w
            .namespaces
            .iter()
            .map(|g| b.namespace(g))
            .collect::<Vec<_>>()
        {
            f.apply(c, m);
        }
        for g in &w.pods {
            let (c, m) = b.pod(g);
            f.apply(c, m);
        }
        for g in &w.policies {
            let (c, m) = b.policy(g);
            f.apply(c, m);
        }
        for p in &w.probes {
            let (Some(from), Some(to)) = (ends(&f.set, &p.from), ends(&f.set, &p.to)) else {
                continue;
            };
            if let Ok(e) = reference::evaluate(&f.set, &from, &to, p.port, p.protocol, p.v6) {
                for d in [&e.egress, &e.ingress] {
                    *seen.entry(format!("{}", d.why)).or_default() += 1;
                }
                *seen.entry(format!("verdict {}", e.verdict)).or_default() += 1;
            }
        }
        let mut owners: BTreeMap<IpAddr, usize> = BTreeMap::new();
        for p in f.set.pods().filter(|p| p.owns_ips()) {
            for ip in &p.ips {
                *owners.entry(*ip).or_default() += 1;
            }
        }
        if owners.values().any(|&n| n > 1) {
            *seen.entry("duplicate address".into()).or_default() += 1;
        }
        if f.set.pods().any(|p| p.host_network) {
            *seen.entry("host network".into()).or_default() += 1;
        }
    }
    for key in [
        "self",
        "not-a-pod",
        "not-selected",
        "allowed",
        "denied",
        "ambiguous",
        "verdict allow",
        "verdict deny",
        "duplicate address",
        "host network",
    ] {
        assert!(
            seen.get(key).copied().unwrap_or(0) > 0,
            "never generated: {key} (saw {seen:?})"
        );
    }
}
