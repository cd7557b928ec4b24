//! Shared helpers for the policy tests: clustersets written as API-shaped JSON, kept both as a
//! model clusterset and as an incrementally updated engine, and probes decided three ways (the
//! incremental engine, a fresh engine built from the clusterset, the reference evaluator), which
//! must agree before anything else is checked.
#![allow(dead_code)]

pub mod reference;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use serde_json::{Value, json};
use weft::model::{
    Cluster, ClusterId, ClusterSet, ClusterSettings, Namespace, NetworkPolicy, Node, Pod, Protocol,
};
use weft::policy::{Connection, Endpoint, Engine, Explanation, Verdict};

use reference::End;

/// A cluster id, which must be valid.
pub fn cid(s: &str) -> ClusterId {
    ClusterId::new(s).expect("valid cluster id")
}

/// A namespace manifest.
pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// A NetworkPolicy manifest.
pub fn policy(ns: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": spec
    })
}

/// A node manifest with these InternalIP addresses.
pub fn node(name: &str, ips: &[&str]) -> Value {
    let addresses: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "status": {"addresses": addresses}})
}

/// The containers of the upstream e2e pods: one per (port, protocol) of 80 and 81 over TCP,
/// UDP and SCTP, each port named `serve-<port>-<protocol>`.
pub fn serve_containers() -> Value {
    let mut containers = Vec::new();
    for proto in ["TCP", "UDP", "SCTP"] {
        for port in [80, 81] {
            let lower = proto.to_lowercase();
            containers.push(json!({
                "name": format!("cont-{port}-{lower}"),
                "image": "agnhost",
                "ports": [{"name": format!("serve-{port}-{lower}"), "containerPort": port, "protocol": proto}]
            }));
        }
    }
    Value::Array(containers)
}

/// A running pod on `node-1` with the e2e containers and these addresses.
pub fn pod(ns: &str, name: &str, labels: Value, ips: &[&str]) -> Value {
    let pod_ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{ns}-{name}"), "labels": labels},
        "spec": {"nodeName": "node-1", "containers": serve_containers()},
        "status": {"phase": "Running", "podIPs": pod_ips}
    })
}

/// A clusterset and an engine that received every change of it incrementally.
#[derive(Debug, Default)]
pub struct Fixture {
    /// The model, as a loader would produce it (namespaces implied by pods and policies added).
    pub set: ClusterSet,
    /// The engine, updated one object at a time.
    pub engine: Engine,
    /// Leave namespaces that only pods or policies name out of the model (a loader adds them
    /// with their automatic labels; the engine must decide the same either way).
    pub leave_implied_out: bool,
}

/// The upstream e2e namespaces and pods.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// The upstream e2e pods of each namespace.
pub const PODS: [&str; 3] = ["a", "b", "c"];

impl Fixture {
    /// An empty clusterset.
    pub fn new() -> Self {
        Self::default()
    }

    /// The upstream e2e model in each of `clusters`: namespaces x, y, z (labelled `ns: <name>`)
    /// with pods a, b, c (labelled `pod: <name>`) serving 80 and 81 on TCP, UDP and SCTP; the
    /// pod `k/ns#i/pod#j` has addresses 10.k.i.(j+1) and fd00:k:i::(j+1), and each cluster a
    /// node-1 at 192.168.k.1 and fd99:k::1 (k from 1).
    pub fn xyz(clusters: &[&str]) -> Self {
        let mut f = Self::new();
        for (k, c) in clusters.iter().enumerate() {
            let k = k + 1;
            f.apply(
                c,
                node(
                    "node-1",
                    &[&format!("192.168.{k}.1"), &format!("fd99:{k}::1")],
                ),
            );
            for (i, ns) in NAMESPACES.iter().enumerate() {
                f.apply(c, namespace(ns, json!({"ns": ns})));
                for (j, p) in PODS.iter().enumerate() {
                    let v4 = format!("10.{k}.{i}.{}", j + 1);
                    let v6 = format!("fd00:{k}:{i}::{}", j + 1);
                    f.apply(c, pod(ns, p, json!({"pod": p}), &[&v4, &v6]));
                }
            }
        }
        f
    }

    fn cluster(&mut self, c: &ClusterId) -> &mut Cluster {
        self.set
            .clusters
            .entry(c.clone())
            .or_insert_with(|| Cluster::new(c.clone(), ClusterSettings::default()))
    }

    /// Implies namespace `ns` in the model if undeclared, as the loader does (the engine implies
    /// it on its own).
    fn imply_namespace(&mut self, c: &ClusterId, ns: &str) {
        if self.leave_implied_out {
            self.cluster(c);
            return;
        }
        self.cluster(c)
            .namespaces
            .entry(ns.to_owned())
            .or_insert_with(|| Namespace::implied(c, ns));
    }

    /// Adds or replaces a namespace in both.
    pub fn upsert_namespace(&mut self, ns: Namespace) {
        self.engine.upsert_namespace(&ns);
        let c = ns.cluster.clone();
        self.cluster(&c).namespaces.insert(ns.name.clone(), ns);
    }

    /// Adds or replaces a pod in both.
    pub fn upsert_pod(&mut self, pod: Pod) {
        self.engine.upsert_pod(&pod);
        let c = pod.cluster.clone();
        self.imply_namespace(&c, &pod.namespace);
        self.cluster(&c).pods.insert(pod.uid.clone(), pod);
    }

    /// Adds or replaces a policy in both.
    pub fn upsert_policy(&mut self, p: NetworkPolicy) {
        self.engine.upsert_policy(&p);
        let c = p.cluster.clone();
        self.imply_namespace(&c, &p.namespace);
        self.cluster(&c)
            .policies
            .insert((p.namespace.clone(), p.name.clone()), p);
    }

    /// Adds or replaces a node in both.
    pub fn upsert_node(&mut self, n: Node) {
        self.engine.upsert_node(&n);
        let c = n.cluster.clone();
        self.cluster(&c).nodes.insert(n.name.clone(), n);
    }

    /// Adds or replaces the object of `manifest` (Namespace, Pod, Node or NetworkPolicy) in
    /// cluster `cluster`, converting it as the loader does.
    pub fn apply(&mut self, cluster: &str, manifest: Value) -> &mut Self {
        let c = cid(cluster);
        let kind = manifest["kind"]
            .as_str()
            .expect("manifest has a kind")
            .to_owned();
        match kind.as_str() {
            "Namespace" => {
                let api = serde_json::from_value(manifest).expect("a Namespace");
                let (ns, _) = Namespace::from_api(&c, &api).expect("a valid Namespace");
                self.upsert_namespace(ns);
            }
            "Pod" => {
                let api = serde_json::from_value(manifest).expect("a Pod");
                self.upsert_pod(Pod::from_api(&c, &api).expect("a valid Pod"));
            }
            "Node" => {
                let api = serde_json::from_value(manifest).expect("a Node");
                self.upsert_node(Node::from_api(&c, &api).expect("a valid Node"));
            }
            "NetworkPolicy" => {
                let api = serde_json::from_value(manifest).expect("a NetworkPolicy");
                let mut warnings = Vec::new();
                let p = NetworkPolicy::from_api(&c, &api, &mut warnings)
                    .expect("a valid NetworkPolicy");
                self.upsert_policy(p);
            }
            other => panic!("unsupported kind {other}"),
        }
        self
    }

    /// Removes pod `ns/name` of `cluster` from both.
    pub fn remove_pod(&mut self, cluster: &str, ns: &str, name: &str) -> &mut Self {
        let c = cid(cluster);
        let uid = self.set.clusters[&c]
            .pod(ns, name)
            .expect("pod exists")
            .uid
            .clone();
        self.remove_pod_uid(cluster, &uid)
    }

    /// Removes pod (cluster, uid) from both.
    pub fn remove_pod_uid(&mut self, cluster: &str, uid: &str) -> &mut Self {
        let c = cid(cluster);
        self.engine.remove_pod(&c, uid);
        if let Some(cl) = self.set.clusters.get_mut(&c) {
            cl.pods.remove(uid);
        }
        self
    }

    /// Removes policy `ns/name` of `cluster` from both.
    pub fn remove_policy(&mut self, cluster: &str, ns: &str, name: &str) -> &mut Self {
        let c = cid(cluster);
        self.engine.remove_policy(&c, ns, name);
        if let Some(cl) = self.set.clusters.get_mut(&c) {
            cl.policies.remove(&(ns.to_owned(), name.to_owned()));
        }
        self
    }

    /// Removes namespace `name` of `cluster` from both (its pods and policies stay).
    pub fn remove_namespace(&mut self, cluster: &str, name: &str) -> &mut Self {
        let c = cid(cluster);
        self.engine.remove_namespace(&c, name);
        if let Some(cl) = self.set.clusters.get_mut(&c) {
            cl.namespaces.remove(name);
        }
        self
    }

    /// Every pod, as `cluster/namespace/name`, sorted.
    pub fn pod_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .set
            .pods()
            .map(|p| format!("{}/{}/{}", p.cluster, p.namespace, p.name))
            .collect();
        v.sort();
        v
    }

    /// The reference's name for `spec`: `cluster/namespace/pod` or an address.
    pub fn end(&self, spec: &str) -> End {
        if let Ok(ip) = spec.parse::<IpAddr>() {
            return End::Ip(ip);
        }
        let parts: Vec<&str> = spec.split('/').collect();
        let [c, ns, name] = parts[..] else {
            panic!("{spec:?} is neither an address nor cluster/namespace/pod")
        };
        let c = cid(c);
        let uid = self
            .set
            .clusters
            .get(&c)
            .and_then(|cl| cl.pod(ns, name))
            .unwrap_or_else(|| panic!("no pod {spec}"))
            .uid
            .clone();
        End::Pod { cluster: c, uid }
    }

    /// The engine's endpoint for `spec` on a connection of the family of `v6`.
    pub fn endpoint(engine: &Engine, spec: &str, v6: bool) -> Endpoint {
        if let Ok(ip) = spec.parse::<IpAddr>() {
            return engine.address_endpoint(ip);
        }
        let parts: Vec<&str> = spec.split('/').collect();
        let [c, ns, name] = parts[..] else {
            panic!("{spec:?} is neither an address nor cluster/namespace/pod")
        };
        let id = engine
            .pod_by_name(c, ns, name)
            .unwrap_or_else(|| panic!("engine has no pod {spec}"));
        engine
            .pod_endpoint(id, v6)
            .unwrap_or_else(|e| panic!("{spec}: {e}"))
    }

    /// Decides `from` → `to` with the incremental engine, checks that a fresh engine and the
    /// reference evaluator explain it identically, and returns the explanation. The family is
    /// IPv6 when an address end is IPv6 (after unmapping), else IPv4.
    pub fn check(&self, from: &str, to: &str, port: u16, protocol: Protocol) -> Explanation {
        let v6 = [from, to].iter().any(|s| {
            s.parse::<IpAddr>()
                .is_ok_and(|ip| ip.to_canonical().is_ipv6())
        });
        self.check_family(from, to, port, protocol, v6)
    }

    /// As [`Fixture::check`], with pods on their IPv6 addresses.
    pub fn check6(&self, from: &str, to: &str, port: u16, protocol: Protocol) -> Explanation {
        self.check_family(from, to, port, protocol, true)
    }

    fn check_family(
        &self,
        from: &str,
        to: &str,
        port: u16,
        protocol: Protocol,
        v6: bool,
    ) -> Explanation {
        let fresh = Engine::from_clusterset(&self.set);
        self.check_with(&fresh, from, to, port, protocol, v6)
    }

    fn check_with(
        &self,
        fresh: &Engine,
        from: &str,
        to: &str,
        port: u16,
        protocol: Protocol,
        v6: bool,
    ) -> Explanation {
        let decide = |e: &Engine| {
            let c = Connection {
                src: Self::endpoint(e, from, v6),
                dst: Self::endpoint(e, to, v6),
                port,
                protocol,
            };
            e.explain(&c, &e.decide(&c))
        };
        let got = decide(&self.engine);
        let probe = format!("{from} -> {to} {port}/{protocol} (v6: {v6})");
        assert_eq!(
            got,
            decide(fresh),
            "incremental and fresh engines differ on {probe}"
        );
        let want = reference::evaluate(
            &self.set,
            &self.end(from),
            &self.end(to),
            port,
            protocol,
            v6,
        )
        .unwrap_or_else(|e| panic!("reference cannot evaluate {probe}: {e}"));
        assert_eq!(got, want, "engine and reference differ on {probe}");
        if protocol != Protocol::Tcp {
            let src = Self::endpoint(&self.engine, from, v6);
            let dst = Self::endpoint(&self.engine, to, v6);
            self.check_packets(&got, src, dst, port, protocol, &probe);
        }
        got
    }

    /// Checks that the packet layer compiled for every pod (`Engine::packet_policy`) admits
    /// exactly what the decision does, direction by direction, with the identity layer on
    /// ingress (no identity is proven off the proxy).
    fn check_packets(
        &self,
        decided: &Explanation,
        src: Endpoint,
        dst: Endpoint,
        port: u16,
        protocol: Protocol,
        probe: &str,
    ) {
        if let (Endpoint::Pod { pod: a, .. }, Endpoint::Pod { pod: b, .. }) = (src, dst)
            && a == b
        {
            return; // a pod's traffic to itself never reaches the node
        }
        let pods = self.pod_names().into_iter().filter_map(|name| {
            let parts: Vec<&str> = name.split('/').collect();
            self.engine.pod_by_name(parts[0], parts[1], parts[2])
        });
        let packets = self.engine.packet_policy(pods.collect::<Vec<_>>());
        let admits = |grants: Option<&Option<Vec<weft::policy::Grant>>>, peer: IpAddr| match grants
        {
            None | Some(None) => true,
            Some(Some(grants)) => grants.iter().any(|g| {
                g.protocol == protocol
                    && (g.ports.0..=g.ports.1).contains(&port)
                    && (g.peers.first..=g.peers.last).contains(&peer)
            }),
        };
        let egress = admits(packets.pods.get(&src.ip()).map(|p| &p.egress), dst.ip());
        let ingress = admits(packets.pods.get(&dst.ip()).map(|p| &p.ingress), src.ip());
        let identity = match dst {
            Endpoint::Pod { pod, .. } => self
                .engine
                .decide_identity(pod, port, protocol, None)
                .enforced
                .passes(),
            _ => true,
        };
        assert_eq!(
            egress,
            decided.egress.verdict == Verdict::Allow,
            "packet layer and decision differ on egress of {probe}"
        );
        assert_eq!(
            ingress,
            decided.ingress.verdict == Verdict::Allow && identity,
            "packet layer and decision differ on ingress of {probe}"
        );
    }

    /// The verdict of `from` → `to` (checked as [`Fixture::check`]).
    pub fn verdict(&self, from: &str, to: &str, port: u16, protocol: Protocol) -> Verdict {
        self.check(from, to, port, protocol).verdict
    }

    /// Checks every pair of pods on (`port`, `protocol`) against `want`, printing both truth
    /// tables on a mismatch.
    pub fn validate(&self, want: &Reachability, port: u16, protocol: Protocol) {
        let fresh = Engine::from_clusterset(&self.set);
        let pods = self.pod_names();
        assert_eq!(pods, want.pods, "the truth table must name every pod");
        let mut got = Reachability::new(&pods, true);
        for from in &pods {
            for to in &pods {
                let e = self.check_with(&fresh, from, to, port, protocol, false);
                got.set(from, to, e.verdict == Verdict::Allow);
            }
        }
        if got.allowed != want.allowed {
            panic!(
                "reachability on {port}/{protocol} differs\nexpected:\n{}\nactual:\n{}",
                want.table(),
                got.table()
            );
        }
    }

    /// An all-true truth table over this fixture's pods.
    pub fn reachability(&self) -> Reachability {
        Reachability::new(&self.pod_names(), true)
    }
}

/// An expected truth table, as upstream's e2e `Reachability`: every (from, to) pair of pods.
/// A pod's traffic to itself is always allowed in weft, whatever is expected of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reachability {
    pods: Vec<String>,
    allowed: BTreeMap<(String, String), bool>,
}

/// Whether `pattern` (`cluster/ns/pod` or `ns/pod`, each part a name or `*`) names `pod`.
fn glob(pattern: &str, pod: &str) -> bool {
    let mut p: Vec<&str> = pattern.split('/').collect();
    if p.len() == 2 {
        p.insert(0, "*");
    }
    assert_eq!(p.len(), 3, "bad pod pattern {pattern:?}");
    p.iter()
        .zip(pod.split('/'))
        .all(|(want, have)| *want == "*" || *want == have)
}

impl Reachability {
    /// Every pair `default`.
    pub fn new(pods: &[String], default: bool) -> Self {
        let mut allowed = BTreeMap::new();
        for a in pods {
            for b in pods {
                allowed.insert((a.clone(), b.clone()), default || a == b);
            }
        }
        Self {
            pods: pods.to_vec(),
            allowed,
        }
    }

    fn set(&mut self, from: &str, to: &str, v: bool) {
        *self
            .allowed
            .get_mut(&(from.to_owned(), to.to_owned()))
            .expect("known pods") = v;
    }

    /// Expects every pair from a pod matching `from` to a pod matching `to` (patterns
    /// `cluster/ns/pod` or `ns/pod`, `*` for any) to be `allowed`; self pairs stay allowed.
    pub fn expect(&mut self, from: &str, to: &str, allowed: bool) -> &mut Self {
        for ((a, b), v) in self.allowed.iter_mut() {
            if glob(from, a) && glob(to, b) {
                *v = allowed || a == b;
            }
        }
        self
    }

    /// Expects everything into `to` to be `allowed`.
    pub fn expect_all_ingress(&mut self, to: &str, allowed: bool) -> &mut Self {
        self.expect("*/*/*", to, allowed)
    }

    /// Expects everything out of `from` to be `allowed`.
    pub fn expect_all_egress(&mut self, from: &str, allowed: bool) -> &mut Self {
        self.expect(from, "*/*/*", allowed)
    }

    /// Rows are sources, columns destinations; `.` allowed, `X` denied.
    fn table(&self) -> String {
        let mut out = format!("{:<16}", "from\\to");
        for (i, _) in self.pods.iter().enumerate() {
            let _ = write!(out, "{i:>3}");
        }
        out.push('\n');
        for (i, a) in self.pods.iter().enumerate() {
            let _ = write!(out, "{i:>3} {a:<12}");
            for b in &self.pods {
                let v = self.allowed[&(a.clone(), b.clone())];
                let _ = write!(out, "{:>3}", if v { "." } else { "X" });
            }
            out.push('\n');
        }
        out
    }
}
