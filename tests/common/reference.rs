//! A plain NetworkPolicy evaluator written from the upstream `networking.k8s.io/v1` reference
//! and weft's multi-cluster rules, for checking the indexed engine against.
//!
//! It shares no code with `weft::policy`: every decision scans every pod, namespace and policy
//! of the clusterset linearly. Only the model types (and `LabelSelector::matches`) are used,
//! plus the engine's explanation types as plain data, so that results compare with `==`.
//! It depends on `weft` and `std` only, so that `benches/policy.rs` can include it too (with
//! `#[allow(dead_code)]` on the `mod` item there, as `tests/common/mod.rs` has for the tests).

use std::net::IpAddr;

use weft::model::labels::namespace_labels;
use weft::model::{
    ClusterId, ClusterSet, IpBlock, LabelSelector, Labels, NetworkPolicy, Peer, Pod, PortSpec,
    Protocol, Rule,
};
use weft::policy::{DirectionExplanation, Explanation, Verdict, Why};

/// One end of a probe, as a caller names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A pod, by (cluster, uid); its address is the one of the probe's family.
    Pod {
        /// Its cluster.
        cluster: ClusterId,
        /// Its uid.
        uid: String,
    },
    /// A bare address (a pod's, a node's, or an external one).
    Ip(IpAddr),
}

/// What an end turns out to be on the connection.
#[derive(Debug, Clone, Copy)]
enum Resolved<'a> {
    /// Exactly one live pod owns the address.
    Pod(&'a Pod, IpAddr),
    /// No live pod owns it (external, a node, a host-network pod).
    Address(IpAddr),
    /// Two or more live pods claim it.
    Ambiguous(IpAddr),
}

impl Resolved<'_> {
    fn ip(&self) -> IpAddr {
        match *self {
            Resolved::Pod(_, ip) | Resolved::Address(ip) | Resolved::Ambiguous(ip) => ip,
        }
    }

    fn pod(&self) -> Option<&Pod> {
        match self {
            Resolved::Pod(p, _) => Some(p),
            _ => None,
        }
    }
}

/// `cluster/namespace/name`.
fn policy_name(p: &NetworkPolicy) -> String {
    format!("{}/{}/{}", p.cluster, p.namespace, p.name)
}

/// The pod (cluster, uid), found by scanning.
pub fn find_pod<'a>(set: &'a ClusterSet, cluster: &ClusterId, uid: &str) -> Option<&'a Pod> {
    set.pods().find(|p| &p.cluster == cluster && p.uid == uid)
}

/// The address the pod (cluster, uid) has on a connection of the family of `v6`: its own for a
/// live pod; for a host-network pod its status address, else its node's InternalIP. `Err` names
/// why the pod cannot be an end of such a connection.
pub fn pod_address(
    set: &ClusterSet,
    cluster: &ClusterId,
    uid: &str,
    v6: bool,
) -> Result<IpAddr, String> {
    let pod = find_pod(set, cluster, uid).ok_or_else(|| format!("no pod {cluster}/{uid}"))?;
    let of_family = |ips: &[IpAddr]| ips.iter().copied().find(|ip| ip.is_ipv6() == v6);
    if pod.host_network {
        let node_ips: Vec<IpAddr> = set
            .nodes()
            .filter(|n| &n.cluster == cluster && Some(&n.name) == pod.node_name.as_ref())
            .flat_map(|n| n.addresses.iter().copied())
            .collect();
        return of_family(&pod.ips)
            .or_else(|| of_family(&node_ips))
            .ok_or_else(|| format!("host-network pod {} has no address of the family", pod.name));
    }
    let ip = of_family(&pod.ips)
        .ok_or_else(|| format!("pod {} has no address of the family", pod.name))?;
    if !pod.owns_ips() {
        return Err(format!("pod {} is not live", pod.name));
    }
    Ok(ip)
}

/// The live pods owning `ip`.
fn owners(set: &ClusterSet, ip: IpAddr) -> Vec<&Pod> {
    set.pods()
        .filter(|p| p.owns_ips() && p.ips.contains(&ip))
        .collect()
}

fn resolve_ip(set: &ClusterSet, ip: IpAddr) -> Resolved<'_> {
    let ip = ip.to_canonical();
    match owners(set, ip).as_slice() {
        [one] => Resolved::Pod(one, ip),
        [] => Resolved::Address(ip),
        _ => Resolved::Ambiguous(ip),
    }
}

fn resolve<'a>(set: &'a ClusterSet, end: &End, v6: bool) -> Result<Resolved<'a>, String> {
    match end {
        End::Ip(ip) => Ok(resolve_ip(set, *ip)),
        End::Pod { cluster, uid } => {
            let ip = pod_address(set, cluster, uid, v6)?;
            let pod = find_pod(set, cluster, uid).expect("found by pod_address");
            if pod.host_network {
                // Its traffic is its node's: an address, whoever else claims it.
                Ok(Resolved::Address(ip))
            } else {
                Ok(resolve_ip(set, ip))
            }
        }
    }
}

/// Whether `sel` selects namespace (cluster, name), by its declared labels, or by its
/// automatic ones when it is only implied by the pods in it.
fn ns_selected(set: &ClusterSet, sel: &LabelSelector, cluster: &ClusterId, name: &str) -> bool {
    match set
        .namespaces()
        .find(|n| &n.cluster == cluster && n.name == name)
    {
        Some(ns) => sel.matches(&ns.labels),
        None => sel.matches(&namespace_labels(cluster, name, Labels::new()).0),
    }
}

fn in_block(b: &IpBlock, ip: IpAddr) -> bool {
    b.cidr.contains(&ip) && !b.except.iter().any(|e| e.contains(&ip))
}

fn port_matches(rule: &Rule, port: u16, protocol: Protocol, dst: &Resolved<'_>) -> bool {
    if rule.ports.is_empty() {
        return true;
    }
    rule.ports.iter().any(|p| {
        p.protocol == protocol
            && match &p.port {
                None => true,
                Some(PortSpec::Range { start, end }) => *start <= port && port <= *end,
                Some(PortSpec::Named(name)) => {
                    dst.pod().and_then(|d| d.named_port(name, protocol)) == Some(port)
                }
            }
    })
}

/// The first peer of `rule` matching `peer`: `Some(None)` for a rule without peers, `None`
/// when no peer matches.
fn matching_peer(
    set: &ClusterSet,
    policy: &NetworkPolicy,
    rule: &Rule,
    peer: &Resolved<'_>,
) -> Option<Option<usize>> {
    if rule.peers.is_empty() {
        return Some(None);
    }
    let found = rule.peers.iter().position(|spec| match spec {
        Peer::IpBlock(b) => in_block(b, peer.ip()),
        Peer::Pods {
            pod_selector,
            namespace_selector,
        } => {
            let Some(q) = peer.pod() else {
                return false;
            };
            let pod_ok = pod_selector.as_ref().is_none_or(|s| s.matches(&q.labels));
            let ns_ok = match namespace_selector {
                // Pods of the policy's own namespace, in the policy's own cluster.
                None => q.cluster == policy.cluster && q.namespace == policy.namespace,
                // Pods of matching namespaces of every cluster.
                Some(ns) => ns_selected(set, ns, &q.cluster, &q.namespace),
            };
            pod_ok && ns_ok
        }
    });
    found.map(Some)
}

/// The note for an allowing rule that admits a pod of another cluster than the policy's.
fn cross_cluster_note(
    policy: &NetworkPolicy,
    rule: &Rule,
    index: usize,
    matched: Option<usize>,
    peer: &Resolved<'_>,
) -> Option<String> {
    let q = peer.pod()?;
    if q.cluster == policy.cluster {
        return None;
    }
    let how = match matched {
        None => "the rule has no peers, so it admits every cluster".to_owned(),
        Some(k) => match &rule.peers[k] {
            Peer::IpBlock(_) => {
                format!("peer {k} is an ipBlock, which matches addresses of every cluster")
            }
            Peer::Pods {
                namespace_selector: Some(ns),
                ..
            } if ns.names_cluster() => {
                format!("peer {k}'s namespaceSelector names its cluster")
            }
            Peer::Pods {
                namespace_selector: Some(_),
                ..
            } => format!(
                "peer {k}'s namespaceSelector names no cluster, so it matches namespaces of every cluster"
            ),
            Peer::Pods {
                namespace_selector: None,
                ..
            } => return None,
        },
    };
    Some(format!(
        "{} rule {index} admits {}/{}/{} of another cluster: {how}",
        policy_name(policy),
        q.cluster,
        q.namespace,
        q.name
    ))
}

fn explanation(why: Why, policies: Vec<String>, rules: Vec<String>) -> DirectionExplanation {
    let verdict = match why {
        Why::Denied | Why::Ambiguous => Verdict::Deny,
        _ => Verdict::Allow,
    };
    DirectionExplanation {
        verdict,
        why,
        policies,
        rules,
        notes: Vec::new(),
    }
}

/// A direction whose own end is an address several live pods claim.
fn ambiguous(set: &ClusterSet, ip: IpAddr) -> DirectionExplanation {
    let mut names: Vec<String> = owners(set, ip)
        .iter()
        .map(|p| format!("{}/{}/{}", p.cluster, p.namespace, p.name))
        .collect();
    names.sort();
    DirectionExplanation {
        notes: vec![format!(
            "address {ip} is claimed by {}: it matches none of them",
            names.join(", ")
        )],
        ..explanation(Why::Ambiguous, vec![], vec![])
    }
}

/// One direction of `pod`: egress (peer = destination) or ingress (peer = source).
fn direction<'a>(
    set: &'a ClusterSet,
    pod: &Pod,
    ingress: bool,
    peer: &Resolved<'_>,
    dst: &Resolved<'_>,
    port: u16,
    protocol: Protocol,
) -> DirectionExplanation {
    let rules_of = |p: &'a NetworkPolicy| {
        if ingress {
            p.ingress.as_ref()
        } else {
            p.egress.as_ref()
        }
    };
    let selecting: Vec<&NetworkPolicy> = set
        .policies()
        .filter(|p| {
            p.cluster == pod.cluster
                && p.namespace == pod.namespace
                && !pod.host_network
                && rules_of(p).is_some()
                && p.pod_selector.matches(&pod.labels)
        })
        .collect();
    if selecting.is_empty() {
        return explanation(Why::NotSelected, vec![], vec![]);
    }
    let mut allowing: Vec<(String, usize, Option<String>)> = Vec::new();
    for p in &selecting {
        for (i, rule) in rules_of(p).into_iter().flatten().enumerate() {
            if !port_matches(rule, port, protocol, dst) {
                continue;
            }
            if let Some(matched) = matching_peer(set, p, rule, peer) {
                let note = cross_cluster_note(p, rule, i, matched, peer);
                allowing.push((policy_name(p), i, note));
            }
        }
    }
    if allowing.is_empty() {
        let mut names: Vec<String> = selecting.iter().map(|p| policy_name(p)).collect();
        names.sort();
        names.dedup();
        return explanation(Why::Denied, names, vec![]);
    }
    allowing.sort();
    let mut policies: Vec<String> = allowing.iter().map(|(p, _, _)| p.clone()).collect();
    policies.dedup();
    let rules = allowing
        .iter()
        .map(|(p, i, _)| format!("{p} rule {i}"))
        .collect();
    DirectionExplanation {
        notes: allowing.into_iter().filter_map(|(_, _, n)| n).collect(),
        ..explanation(Why::Allowed, policies, rules)
    }
}

/// Decides a connection from `from` to `to` on (`port`, `protocol`); pod ends use their address
/// of the family of `v6`. `Err` when a pod end has no such address.
pub fn evaluate(
    set: &ClusterSet,
    from: &End,
    to: &End,
    port: u16,
    protocol: Protocol,
    v6: bool,
) -> Result<Explanation, String> {
    let src = resolve(set, from, v6)?;
    let dst = resolve(set, to, v6)?;
    let (egress, ingress) = match (&src, &dst) {
        (Resolved::Pod(a, _), Resolved::Pod(b, _)) if a.cluster == b.cluster && a.uid == b.uid => (
            explanation(Why::SelfTraffic, vec![], vec![]),
            explanation(Why::SelfTraffic, vec![], vec![]),
        ),
        _ => {
            let egress = match &src {
                Resolved::Pod(p, _) => direction(set, p, false, &dst, &dst, port, protocol),
                Resolved::Address(_) => explanation(Why::NotAPod, vec![], vec![]),
                Resolved::Ambiguous(ip) => ambiguous(set, *ip),
            };
            let ingress = match &dst {
                Resolved::Pod(p, _) => direction(set, p, true, &src, &dst, port, protocol),
                Resolved::Address(_) => explanation(Why::NotAPod, vec![], vec![]),
                Resolved::Ambiguous(ip) => ambiguous(set, *ip),
            };
            (egress, ingress)
        }
    };
    let verdict = if egress.verdict == Verdict::Allow && ingress.verdict == Verdict::Allow {
        Verdict::Allow
    } else {
        Verdict::Deny
    };
    Ok(Explanation {
        verdict,
        egress,
        ingress,
    })
}
