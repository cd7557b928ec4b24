//! The lab's addressing, worked out from a clusterset before anything is created: which nodes
//! and pods get a namespace, the segment the nodes share with the wire, and the wire's own
//! address. Pure, so the rules are tested without root.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::Ipv4Net;

use super::LabError;
use crate::model::{ClusterId, ClusterSet, Protocol};

/// The narrowest segment the nodes are put on: room for the wire's address beside them.
const NARROWEST_SEGMENT: u8 = 24;
/// The widest segment: nodes spread wider than this are refused rather than bridged onto a
/// segment that would shadow most of the address space.
const WIDEST_SEGMENT: u8 = 8;

/// A node that gets a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedNode {
    /// Its cluster.
    pub cluster: ClusterId,
    /// Its name.
    pub name: String,
    /// Its first IPv4 InternalIP: its address on the wire.
    pub ip: Ipv4Addr,
    /// Its first IPv6 InternalIP, if it has one: its IPv6 address on the wire.
    pub ip6: Option<Ipv6Addr>,
}

/// A pod that gets a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPod {
    /// Its cluster.
    pub cluster: ClusterId,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
    /// Its IPv6 address, if it has one and its node has one too (dual-stack).
    pub ip6: Option<Ipv6Addr>,
    /// Its node, an index into [`Plan::nodes`].
    pub node: usize,
    /// The TCP ports its containers declare, sorted, without duplicates.
    pub tcp_ports: Vec<u16>,
}

/// Every namespace of a lab and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The segment the wire and every node share.
    pub segment: Ipv4Net,
    /// The wire's address on it.
    pub wire: Ipv4Addr,
    /// The wire's IPv6 address, when a node has one: the first free address of the first
    /// such node's /64.
    pub wire6: Option<Ipv6Addr>,
    /// Nodes, ordered by cluster and name.
    pub nodes: Vec<PlannedNode>,
    /// Pods, ordered by cluster, namespace and name.
    pub pods: Vec<PlannedPod>,
    /// What got no namespace, and why (one line each).
    pub skipped: Vec<String>,
}

impl Plan {
    /// The plan for `clusterset`, with the wire at `wire` (else the segment's first free
    /// address). Every node and pod needs an IPv4 address; a pod's IPv6 address is wired too
    /// when its node has one (dual-stack).
    pub fn new(clusterset: &ClusterSet, wire: Option<Ipv4Addr>) -> Result<Self, LabError> {
        let topology = |message: String| LabError::Topology { message };
        let mut skipped = Vec::new();
        let mut nodes = Vec::new();
        for node in clusterset.nodes() {
            match node.addresses.iter().find_map(|a| match a {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            }) {
                Some(ip) => nodes.push(PlannedNode {
                    cluster: node.cluster.clone(),
                    name: node.name.clone(),
                    ip,
                    ip6: first_v6(&node.addresses),
                }),
                None => skipped.push(format!(
                    "node {}/{}: no IPv4 InternalIP",
                    node.cluster, node.name
                )),
            }
        }
        if nodes.is_empty() {
            return Err(topology("no node has an IPv4 InternalIP".into()));
        }
        nodes.sort_by(|a, b| (&a.cluster, &a.name).cmp(&(&b.cluster, &b.name)));
        // Every address the plan hands out, with its owner, to refuse duplicates.
        let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut own = |ip: IpAddr, owner: String| match owners.insert(ip, owner.clone()) {
            Some(first) => Err(topology(format!("{first} and {owner} both have {ip}"))),
            None => Ok(()),
        };
        for node in &nodes {
            let owner = format!("node {}/{}", node.cluster, node.name);
            own(node.ip.into(), owner.clone())?;
            if let Some(ip6) = node.ip6 {
                own(ip6.into(), owner)?;
            }
        }
        let node_index: BTreeMap<(&ClusterId, &str), usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| ((&n.cluster, n.name.as_str()), i))
            .collect();
        let mut pods = Vec::new();
        for pod in clusterset.pods() {
            let name = format!("{}/{}/{}", pod.cluster, pod.namespace, pod.name);
            if !pod.owns_ips() {
                if pod.host_network {
                    skipped.push(format!("pod {name}: host network, no namespace of its own"));
                }
                continue;
            }
            let Some(ip) = pod.ips.iter().find_map(|a| match a {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            }) else {
                skipped.push(format!("pod {name}: no IPv4 address"));
                continue;
            };
            let node = pod
                .node_name
                .as_deref()
                .and_then(|n| node_index.get(&(&pod.cluster, n)).copied());
            let Some(node) = node else {
                skipped.push(format!(
                    "pod {name}: its node {} has no namespace",
                    pod.node_name.as_deref().unwrap_or("(none)")
                ));
                continue;
            };
            own(ip.into(), format!("pod {name}"))?;
            let ip6 = match (first_v6(&pod.ips), nodes[node].ip6) {
                (Some(ip6), Some(_)) => {
                    own(ip6.into(), format!("pod {name}"))?;
                    Some(ip6)
                }
                (Some(ip6), None) => {
                    skipped.push(format!(
                        "pod {name}: {ip6} left out, its node has no IPv6 InternalIP"
                    ));
                    None
                }
                (None, _) => None,
            };
            let mut tcp_ports: Vec<u16> = pod
                .ports
                .iter()
                .filter(|p| p.protocol == Protocol::Tcp)
                .map(|p| p.port)
                .collect();
            tcp_ports.sort_unstable();
            tcp_ports.dedup();
            pods.push(PlannedPod {
                cluster: pod.cluster.clone(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                ip,
                ip6,
                node,
                tcp_ports,
            });
        }
        pods.sort_by(|a, b| {
            (&a.cluster, &a.namespace, &a.name).cmp(&(&b.cluster, &b.namespace, &b.name))
        });

        let mut covered: Vec<Ipv4Addr> = nodes.iter().map(|n| n.ip).collect();
        covered.extend(wire);
        let segment = covering_segment(&covered).ok_or_else(|| {
            topology(format!(
                "the node addresses ({}) span more than a /{WIDEST_SEGMENT}: the lab puts them on one segment",
                covered
                    .iter()
                    .map(Ipv4Addr::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let wire = match wire {
            Some(ip) => {
                if let Some(owner) = owners.get(&IpAddr::V4(ip)) {
                    return Err(topology(format!("the wire's address {ip} is {owner}'s")));
                }
                ip
            }
            None => segment
                .hosts()
                .find(|ip| !owners.contains_key(&IpAddr::V4(*ip)))
                .ok_or_else(|| topology(format!("no free address left in {segment}")))?,
        };
        let wire6 = match nodes.iter().find_map(|n| n.ip6) {
            Some(node6) => {
                let net = u128::from(node6) & !u128::from(u64::MAX);
                let free = (1..=u128::from(u16::MAX))
                    .map(|host| Ipv6Addr::from(net | host))
                    .find(|ip| !owners.contains_key(&IpAddr::V6(*ip)))
                    .ok_or_else(|| topology(format!("no free IPv6 address beside {node6}")))?;
                Some(free)
            }
            None => None,
        };
        Ok(Self {
            segment,
            wire,
            wire6,
            nodes,
            pods,
            skipped,
        })
    }
}

/// The first IPv6 address of `ips`.
fn first_v6(ips: &[IpAddr]) -> Option<Ipv6Addr> {
    ips.iter().find_map(|a| match a {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    })
}

/// The segment that holds every address of `ips`: their common prefix, but never narrower
/// than a /24 (the wire needs an address beside them) nor wider than a /8. `None` when the
/// addresses do not fit in a /8.
pub fn covering_segment(ips: &[Ipv4Addr]) -> Option<Ipv4Net> {
    let first = u32::from(*ips.first()?);
    let differing = ips
        .iter()
        .fold(0u32, |acc, ip| acc | (u32::from(*ip) ^ first));
    // leading_zeros is at most 32, so the narrowing to u8 cannot truncate.
    let common = u8::try_from(differing.leading_zeros()).unwrap_or(32);
    let len = common.min(NARROWEST_SEGMENT);
    if len < WIDEST_SEGMENT {
        return None;
    }
    Ipv4Net::new(Ipv4Addr::from(first), len)
        .ok()
        .map(|n| n.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerPort, Node, Pod, PodPhase, loader};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("an address")
    }

    #[test]
    fn segments_cover_the_nodes_and_leave_room() {
        let cases: &[(&[&str], Option<&str>)] = &[
            (&["192.168.1.11", "192.168.2.11"], Some("192.168.0.0/22")),
            (&["192.168.1.11"], Some("192.168.1.0/24")),
            (&["10.0.0.1", "10.0.0.2"], Some("10.0.0.0/24")),
            (&["10.0.0.1", "10.200.0.1"], Some("10.0.0.0/8")),
            (&["10.0.0.1", "172.16.0.1"], None),
            (&[], None),
        ];
        for (ips, want) in cases {
            let ips: Vec<Ipv4Addr> = ips.iter().map(|s| ip(s)).collect();
            let got = covering_segment(&ips).map(|n| n.to_string());
            assert_eq!(got.as_deref(), *want, "{ips:?}");
        }
    }

    #[test]
    fn the_two_cluster_example_plans_two_nodes_and_four_pods() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/two-cluster/1-no-policy");
        let loaded = loader::load_clusterset(&dir).expect("loads");
        let plan = Plan::new(&loaded.clusterset, None).expect("a plan");
        assert_eq!(plan.segment.to_string(), "192.168.0.0/22");
        assert_eq!(plan.wire, ip("192.168.0.1"));
        let nodes: Vec<_> = plan.nodes.iter().map(|n| (n.name.as_str(), n.ip)).collect();
        assert_eq!(
            nodes,
            [
                ("c1-node-1", ip("192.168.1.11")),
                ("c2-node-1", ip("192.168.2.11"))
            ]
        );
        let pods: Vec<_> = plan
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.ip, p.node, p.tcp_ports.clone()))
            .collect();
        assert_eq!(
            pods,
            [
                ("tmp-client", ip("10.1.1.20"), 0, vec![]),
                ("web-c1", ip("10.1.1.10"), 0, vec![80]),
                ("impostor", ip("10.2.1.20"), 1, vec![]),
                ("web-c2", ip("10.2.1.10"), 1, vec![80]),
            ]
        );
        assert!(plan.skipped.is_empty(), "{:?}", plan.skipped);
        let wired = Plan::new(&loaded.clusterset, Some(ip("192.168.3.254"))).expect("a plan");
        assert_eq!(wired.wire, ip("192.168.3.254"));
        let taken = Plan::new(&loaded.clusterset, Some(ip("192.168.1.11"))).expect_err("taken");
        assert!(taken.to_string().contains("c1-node-1"), "{taken}");
    }

    /// Nodes (name, addresses) and pods (name, node, addresses, host network); addresses are
    /// comma-separated.
    fn clusterset(nodes: &[(&str, &str)], pods: &[(&str, &str, &str, bool)]) -> ClusterSet {
        let mut set = ClusterSet::default();
        let id = ClusterId::new("c").expect("id");
        let mut cluster = crate::model::Cluster::new(id.clone(), Default::default());
        for (name, addr) in nodes {
            cluster.nodes.insert(
                (*name).to_owned(),
                Node {
                    cluster: id.clone(),
                    name: (*name).to_owned(),
                    uid: (*name).to_owned(),
                    labels: Default::default(),
                    addresses: addr.split(',').map(|a| a.parse().expect("ip")).collect(),
                },
            );
        }
        for (name, node, addr, host) in pods {
            cluster.pods.insert(
                (*name).to_owned(),
                Pod {
                    cluster: id.clone(),
                    uid: (*name).to_owned(),
                    namespace: "ns".into(),
                    name: (*name).to_owned(),
                    labels: Default::default(),
                    phase: PodPhase::Running,
                    ips: addr.split(',').map(|a| a.parse().expect("ip")).collect(),
                    host_network: *host,
                    node_name: Some((*node).to_owned()),
                    service_account: "default".into(),
                    ports: vec![
                        ContainerPort {
                            name: None,
                            port: 8080,
                            protocol: Protocol::Tcp,
                        },
                        ContainerPort {
                            name: None,
                            port: 53,
                            protocol: Protocol::Udp,
                        },
                    ],
                },
            );
        }
        set.clusters.insert(id, cluster);
        set
    }

    #[test]
    fn what_cannot_be_wired_is_skipped_or_refused() {
        let set = clusterset(
            &[("b", "10.0.0.2"), ("a", "10.0.0.1"), ("v6", "fd00::1")],
            &[
                ("p", "b", "10.9.0.1", false),
                ("host", "a", "10.0.0.1", true),
                ("lost", "nowhere", "10.9.0.2", false),
                ("six", "a", "fd00::9", false),
            ],
        );
        let plan = Plan::new(&set, None).expect("a plan");
        assert_eq!(
            plan.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(plan.pods.len(), 1);
        assert_eq!(
            plan.pods[0].node, 1,
            "the pod follows its node's sorted place"
        );
        assert_eq!(plan.pods[0].tcp_ports, [8080], "TCP ports only");
        assert_eq!(plan.wire, ip("10.0.0.3"), "the first address no node has");
        assert_eq!(plan.skipped.len(), 4, "{:?}", plan.skipped);
        assert_eq!(plan.wire6, None, "no wired node has IPv6");

        let clash = clusterset(&[("a", "10.0.0.1")], &[("p", "a", "10.0.0.1", false)]);
        let e = Plan::new(&clash, None).expect_err("a pod at the node's address");
        assert!(e.to_string().contains("both have 10.0.0.1"), "{e}");
        let none = clusterset(&[("v6", "fd00::1")], &[]);
        assert!(Plan::new(&none, None).is_err());
    }

    #[test]
    fn a_dual_stack_pod_on_a_dual_stack_node_is_wired_with_both_addresses() {
        let set = clusterset(
            &[("a", "10.0.0.1,fd00::1"), ("b", "10.0.0.2")],
            &[
                ("both", "a", "10.9.0.1,fd00::9", false),
                ("four", "a", "10.9.0.2", false),
                ("v4-node", "b", "10.9.0.3,fd00::10", false),
            ],
        );
        let plan = Plan::new(&set, None).expect("a plan");
        let six = "fd00::1".parse().ok();
        assert_eq!(plan.nodes[0].ip6, six);
        assert_eq!(plan.nodes[1].ip6, None);
        assert_eq!(
            plan.wire6,
            "fd00::2".parse().ok(),
            "the first free one beside fd00::1"
        );
        let pods: Vec<_> = plan.pods.iter().map(|p| (p.name.as_str(), p.ip6)).collect();
        assert_eq!(
            pods,
            [
                ("both", "fd00::9".parse().ok()),
                ("four", None),
                ("v4-node", None)
            ]
        );
        assert_eq!(
            plan.skipped,
            ["pod c/ns/v4-node: fd00::10 left out, its node has no IPv6 InternalIP"]
        );

        let clash = clusterset(
            &[("a", "10.0.0.1,fd00::1")],
            &[("p", "a", "10.9.0.1,fd00::1", false)],
        );
        let e = Plan::new(&clash, None).expect_err("a pod at the node's IPv6 address");
        assert!(e.to_string().contains("both have fd00::1"), "{e}");
    }
}
