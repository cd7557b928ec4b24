//! What the packet layer must enforce for a node's pods: traffic the proxy does not carry
//! (UDP, SCTP, and protocols NetworkPolicy cannot name), compiled from the same policies as
//! the proxy's decisions into plain addresses, protocols and ports — for the packet layer in
//! nftables, which knows nothing of selectors.
//!
//! For each local pod address and each direction: not isolated (no policy of that type
//! selects the pod), or isolated with the grants that admit traffic. A grant is (protocol,
//! destination ports, peer addresses); TCP is never granted here (the proxy judges it, and a
//! TCP rule must not open UDP or SCTP: THREATS 34). Semantics mirror [`Engine::decide`]:
//! selectors match pods of every cluster except expired ones, ipBlocks match addresses with
//! their exceptions cut out, named ports resolve on the destination pod (the local pod for
//! ingress, each peer pod for egress; a pod without the name matches nothing), an ambiguous
//! address matches no selector. A pod that an Enforce IdentityPolicy selects admits no
//! non-TCP ingress at all: such traffic proves no identity, and a peer without one matches
//! no identity rule.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Engine, NsIdx, PodEntry, PodId, PodIdx, PolicyIdx};
use crate::model::Protocol;
use crate::policy::compile::{Op, PeerOp, named_port};
use crate::policy::intern::Sym;

/// A range of addresses of one family, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrRange {
    /// The first address.
    pub first: IpAddr,
    /// The last address (of the same family).
    pub last: IpAddr,
}

impl AddrRange {
    /// Every IPv4 address.
    pub const ALL_V4: AddrRange = AddrRange {
        first: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        last: IpAddr::V4(Ipv4Addr::BROADCAST),
    };
    /// Every IPv6 address.
    pub const ALL_V6: AddrRange = AddrRange {
        first: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        last: IpAddr::V6(Ipv6Addr::new(
            0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff, 0xffff,
        )),
    };

    /// The one address `ip`.
    pub fn single(ip: IpAddr) -> Self {
        Self {
            first: ip,
            last: ip,
        }
    }

    /// Whether the range is of IPv6 addresses.
    pub fn is_ipv6(&self) -> bool {
        self.first.is_ipv6()
    }
}

/// Traffic a policy rule admits in the packet layer: over `protocol` (never TCP), to a
/// destination port in `ports`, with the other end's address in `peers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Grant {
    /// UDP or SCTP.
    pub protocol: Protocol,
    /// The first and last destination port.
    pub ports: (u16, u16),
    /// The other end's addresses.
    pub peers: AddrRange,
}

/// One local pod address's packet layer: per direction, `None` when no policy isolates it,
/// else the grants (of the address's family) that admit traffic; an empty list admits none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodPackets {
    /// Traffic to the pod.
    pub ingress: Option<Vec<Grant>>,
    /// Traffic from the pod.
    pub egress: Option<Vec<Grant>>,
}

/// The packet layer of a node: its pods' addresses, each with what it admits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PacketPolicy {
    /// By local pod address.
    pub pods: BTreeMap<IpAddr, PodPackets>,
}

/// What one direction of one policy grants, before the pod it selects is known.
#[derive(Debug, Default)]
struct PolicyGrants {
    /// Grants whatever the selected pod.
    fixed: Vec<Grant>,
    /// Ingress named ports, resolved on each selected pod: (protocol, name, peers).
    named: Vec<(Protocol, Sym, Vec<AddrRange>)>,
}

/// The ports of a rule the packet layer reads: numbered ranges and names, non-TCP only.
#[derive(Debug, Default)]
struct RulePorts {
    numbered: Vec<(Protocol, u16, u16)>,
    named: Vec<(Protocol, Sym)>,
}

impl RulePorts {
    fn of(ops: &[Op]) -> Self {
        let mut ports = RulePorts::default();
        if ops.is_empty() {
            // No ports: every port of every protocol.
            for protocol in [Protocol::Udp, Protocol::Sctp] {
                ports.numbered.push((protocol, 0, u16::MAX));
            }
        }
        for op in ops {
            match *op {
                Op::Ports { protocol, lo, hi } if protocol != Protocol::Tcp && lo <= hi => {
                    ports.numbered.push((protocol, lo, hi));
                }
                Op::NamedPort { protocol, name } if protocol != Protocol::Tcp => {
                    ports.named.push((protocol, name));
                }
                _ => {}
            }
        }
        ports
    }

    fn is_empty(&self) -> bool {
        self.numbered.is_empty() && self.named.is_empty()
    }
}

impl Engine {
    /// The packet layer of the pods `pods` (a node's): for each address they own, whether
    /// each direction is isolated and what it admits. Host-network and finished pods are
    /// left out (they are the node, or own no address).
    pub fn packet_policy(&self, pods: impl IntoIterator<Item = PodId>) -> PacketPolicy {
        let mut grants: HashMap<(PolicyIdx, bool), PolicyGrants> = HashMap::new();
        let mut out = PacketPolicy::default();
        for pod in pods {
            let Some(p) = self.pods.get(pod.0) else {
                continue;
            };
            if p.about.host_network || !p.about.owns_ips {
                continue;
            }
            // "A peer without a proven identity matches none": an Enforce rule selecting the
            // pod denies every non-TCP peer.
            let identity_enforced = !self
                .decide_identity(pod, 0, Protocol::Udp, None)
                .enforced
                .passes();
            for &ip in &p.about.ips {
                let packets = if !self.owns_alone(pod.0, ip) {
                    // An address two pods claim matches neither (as decisions have it):
                    // nothing of it is admitted.
                    PodPackets {
                        ingress: Some(Vec::new()),
                        egress: Some(Vec::new()),
                    }
                } else {
                    let mut direction = |ingress: bool, list: u32| {
                        let selecting = self.policy_lists.get(list).map_or(&[][..], |l| l);
                        if selecting.is_empty() && !(ingress && identity_enforced) {
                            return None;
                        }
                        if ingress && identity_enforced {
                            return Some(Vec::new());
                        }
                        let mut admitted = Vec::new();
                        for &policy in selecting {
                            let g = grants
                                .entry((policy, ingress))
                                .or_insert_with(|| self.policy_grants(policy, ingress));
                            admitted.extend(g.fixed.iter().copied());
                            admitted.extend(self.resolve_named(&g.named, p));
                        }
                        admitted.retain(|g: &Grant| g.peers.is_ipv6() == ip.is_ipv6());
                        admitted.sort_unstable();
                        admitted.dedup();
                        Some(admitted)
                    };
                    PodPackets {
                        ingress: direction(true, p.ingress),
                        egress: direction(false, p.egress),
                    }
                };
                out.pods.insert(ip, packets);
            }
        }
        out
    }

    /// Whether pod `pod` is the one live owner of `ip`.
    fn owns_alone(&self, pod: PodIdx, ip: IpAddr) -> bool {
        self.ips.get(&ip).map(|o| o.as_slice()) == Some(&[pod])
    }

    /// Ingress named ports resolved on the destination pod `dst`.
    fn resolve_named<'a>(
        &'a self,
        named: &'a [(Protocol, Sym, Vec<AddrRange>)],
        dst: &'a PodEntry,
    ) -> impl Iterator<Item = Grant> + 'a {
        let ports = self.port_lists.get(dst.named_ports).map_or(&[][..], |l| l);
        named.iter().flat_map(move |(protocol, name, peers)| {
            let port = named_port(ports, *name, *protocol);
            peers.iter().filter_map(move |&peers| {
                port.map(|n| Grant {
                    protocol: *protocol,
                    ports: (n, n),
                    peers,
                })
            })
        })
    }

    /// What one direction of policy `policy` grants.
    fn policy_grants(&self, policy: PolicyIdx, ingress: bool) -> PolicyGrants {
        let mut out = PolicyGrants::default();
        let Some(program) = self.policies.get(policy).map(|p| &p.program) else {
            return out;
        };
        let ns_selected = |ns, sel| self.selection.get(ns, sel);
        for (port_ops, peer_ops) in program.rules(ingress) {
            let ports = RulePorts::of(port_ops);
            if ports.is_empty() {
                // TCP only: the proxy's.
                continue;
            }
            // The peers' addresses; and, for egress named ports, the peer pods themselves.
            let mut peers = Vec::new();
            let mut peer_pods: Vec<(PodIdx, IpAddr)> = Vec::new();
            if peer_ops.is_empty() {
                peers.extend([AddrRange::ALL_V4, AddrRange::ALL_V6]);
                if !ingress && !ports.named.is_empty() {
                    peer_pods.extend(self.unique_owners());
                }
            }
            for peer in program.peers(peer_ops) {
                match peer {
                    PeerOp::Block(block) => {
                        let Some(block) = block else { continue };
                        let ranges = block.ranges();
                        peers.extend(
                            ranges
                                .iter()
                                .map(|&(first, last)| AddrRange { first, last }),
                        );
                        if !ingress && !ports.named.is_empty() {
                            peer_pods.extend(self.unique_owners().filter(|&(_, ip)| {
                                ranges.iter().any(|&(a, b)| (a..=b).contains(&ip))
                            }));
                        }
                    }
                    PeerOp::Local { ns, .. } => {
                        let matched = self.pods_of(ns, &peer, &ns_selected);
                        peers.extend(matched.iter().map(|&(_, ip)| AddrRange::single(ip)));
                        peer_pods.extend(matched);
                    }
                    PeerOp::Namespaces { sel, .. } => {
                        let namespaces: Vec<NsIdx> = self
                            .namespaces
                            .iter()
                            .map(|(ns, _)| ns)
                            .filter(|&ns| self.selection.get(ns, sel))
                            .collect();
                        for ns in namespaces {
                            let matched = self.pods_of(ns, &peer, &ns_selected);
                            peers.extend(matched.iter().map(|&(_, ip)| AddrRange::single(ip)));
                            peer_pods.extend(matched);
                        }
                    }
                }
            }
            for &(protocol, lo, hi) in &ports.numbered {
                out.fixed.extend(peers.iter().map(|&peers| Grant {
                    protocol,
                    ports: (lo, hi),
                    peers,
                }));
            }
            for &(protocol, name) in &ports.named {
                if ingress {
                    out.named.push((protocol, name, peers.clone()));
                    continue;
                }
                // Egress: the name is resolved on each peer pod, the destination.
                for &(pod, ip) in &peer_pods {
                    let named = self
                        .pods
                        .get(pod)
                        .and_then(|p| self.port_lists.get(p.named_ports))
                        .map_or(&[][..], |l| l);
                    if let Some(n) = named_port(named, name, protocol) {
                        out.fixed.push(Grant {
                            protocol,
                            ports: (n, n),
                            peers: AddrRange::single(ip),
                        });
                    }
                }
            }
        }
        out
    }

    /// Every address with exactly one live owner, with that owner.
    fn unique_owners(&self) -> impl Iterator<Item = (PodIdx, IpAddr)> + '_ {
        self.ips
            .iter()
            .filter_map(|(&ip, owners)| match owners.as_slice() {
                &[one] => Some((one, ip)),
                _ => None,
            })
    }

    /// The addresses of the pods of namespace `ns` that `peer` admits: pods of an expired
    /// cluster match no selector, an address another pod claims too matches nothing.
    fn pods_of(
        &self,
        ns: NsIdx,
        peer: &PeerOp<'_>,
        ns_selected: &impl Fn(u32, u32) -> bool,
    ) -> Vec<(PodIdx, IpAddr)> {
        let Some(entry) = self.namespaces.get(ns) else {
            return Vec::new();
        };
        if self.expired_ns(ns) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for &i in &entry.pods {
            let Some(pod) = self.pods.get(i) else {
                continue;
            };
            let admitted = self
                .label_sets
                .get(pod.labels)
                .is_some_and(|labels| peer.admits_pod(ns, labels, ns_selected));
            if admitted {
                out.extend(
                    pod.about
                        .ips
                        .iter()
                        .filter(|&&ip| self.owns_alone(i, ip))
                        .map(|&ip| (i, ip)),
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::model::{ClusterId, IdentityPolicy, Namespace, NetworkPolicy, Pod};

    fn cid(c: &str) -> ClusterId {
        ClusterId::new(c).expect("cluster id")
    }

    /// Pod `name` of `ns` in cluster `c`, labelled `app: name`, with `ips` and `ports`
    /// (container ports as the API has them).
    fn pod(c: &str, ns: &str, name: &str, ips: &[&str], ports: Value) -> Pod {
        let ips: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        Pod::from_api(
            &cid(c),
            &serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": ns, "uid": format!("{c}-{ns}-{name}"),
                             "labels": {"app": name}},
                "spec": {"nodeName": "node-1", "containers": [{"name": "main", "ports": ports}]},
                "status": {"phase": "Running", "podIPs": ips}}))
            .expect("pod"),
        )
        .expect("valid pod")
    }

    fn policy(c: &str, ns: &str, name: &str, spec: Value) -> NetworkPolicy {
        let api = serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}),
        )
        .expect("policy");
        NetworkPolicy::from_api(&cid(c), &api, &mut Vec::new()).expect("valid policy")
    }

    /// Cluster c1: `web` (10.1.0.1, fd00:1::1) serving udp 53 as `dns`, `db` (10.1.0.2) serving
    /// udp 53 as `dns` too but 5353 in the other order; in namespace `data` of c2: `cache`
    /// (10.2.0.1, fd00:2::1) serving udp 6000 as `dns`. Namespace `data` of c2 is labelled
    /// `team: data`.
    fn engine() -> Engine {
        let mut e = Engine::new();
        let ns = Namespace::from_api(
            &cid("c2"),
            &serde_json::from_value(
                json!({"metadata": {"name": "data", "labels": {"team": "data"}}}),
            )
            .expect("namespace"),
        )
        .expect("valid namespace")
        .0;
        e.upsert_namespace(&ns);
        let dns = |n: u16| json!([{"name": "dns", "containerPort": n, "protocol": "UDP"}]);
        e.upsert_pod(&pod(
            "c1",
            "demo",
            "web",
            &["10.1.0.1", "fd00:1::1"],
            dns(53),
        ));
        e.upsert_pod(&pod("c1", "demo", "db", &["10.1.0.2"], dns(5353)));
        e.upsert_pod(&pod(
            "c2",
            "data",
            "cache",
            &["10.2.0.1", "fd00:2::1"],
            dns(6000),
        ));
        e
    }

    fn packets_of(e: &Engine, c: &str, ns: &str, name: &str) -> BTreeMap<IpAddr, PodPackets> {
        let id = e.pod_by_name(c, ns, name).expect("pod");
        e.packet_policy([id]).pods
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    fn udp(lo: u16, hi: u16, first: &str, last: &str) -> Grant {
        Grant {
            protocol: Protocol::Udp,
            ports: (lo, hi),
            peers: AddrRange {
                first: ip(first),
                last: ip(last),
            },
        }
    }

    #[test]
    fn pods_no_policy_selects_are_not_isolated() {
        let e = engine();
        let web = packets_of(&e, "c1", "demo", "web");
        assert_eq!(web.len(), 2, "both addresses: {web:?}");
        assert!(web.values().all(|p| *p == PodPackets::default()));
    }

    #[test]
    fn a_tcp_rule_isolates_and_grants_nothing_to_udp() {
        let mut e = engine();
        e.upsert_policy(&policy(
            "c1",
            "demo",
            "tcp-only",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"ports": [{"port": 53}, {"port": 53, "protocol": "TCP"}]}]}),
        ));
        let web = packets_of(&e, "c1", "demo", "web");
        assert_eq!(web[&ip("10.1.0.1")].ingress, Some(vec![]));
        assert_eq!(web[&ip("10.1.0.1")].egress, None, "Ingress only");
    }

    #[test]
    fn ip_blocks_become_intervals_without_their_exceptions_per_family() {
        let mut e = engine();
        e.upsert_policy(&policy(
            "c1",
            "demo",
            "blocks",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"ports": [{"port": 5000, "endPort": 5010, "protocol": "UDP"}],
                                "from": [
                                    {"ipBlock": {"cidr": "10.0.0.0/8",
                                                 "except": ["10.1.0.0/16", "10.3.0.0/24"]}},
                                    {"ipBlock": {"cidr": "fd00::/16", "except": ["fd00:1::/32"]}}]}]}),
        ));
        let web = packets_of(&e, "c1", "demo", "web");
        let v4 = [
            udp(5000, 5010, "10.0.0.0", "10.0.255.255"),
            udp(5000, 5010, "10.2.0.0", "10.2.255.255"),
            udp(5000, 5010, "10.3.1.0", "10.255.255.255"),
        ];
        assert_eq!(web[&ip("10.1.0.1")].ingress.as_deref(), Some(&v4[..]));
        let v6 = [
            udp(5000, 5010, "fd00::", "fd00:0:ffff:ffff:ffff:ffff:ffff:ffff"),
            udp(
                5000,
                5010,
                "fd00:2::",
                "fd00:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ),
        ];
        assert_eq!(web[&ip("fd00:1::1")].ingress.as_deref(), Some(&v6[..]));
    }

    #[test]
    fn named_ports_resolve_on_the_destination_pod_each_way() {
        let mut e = engine();
        let spec = json!({"podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": [{"port": "dns", "protocol": "UDP"}, {"port": "nope", "protocol": "UDP"}]}],
            "egress": [{"ports": [{"port": "dns", "protocol": "UDP"}],
                        "to": [{"namespaceSelector": {}}]}]});
        e.upsert_policy(&policy("c1", "demo", "named", spec));
        // Ingress: on the local pod itself (web: 53, db: 5353); a name it lacks admits nothing.
        let web = packets_of(&e, "c1", "demo", "web");
        let db = packets_of(&e, "c1", "demo", "db");
        let all = |lo| udp(lo, lo, "0.0.0.0", "255.255.255.255");
        assert_eq!(web[&ip("10.1.0.1")].ingress, Some(vec![all(53)]));
        assert_eq!(db[&ip("10.1.0.2")].ingress, Some(vec![all(5353)]));
        // Egress: on each peer pod, of every cluster (namespaceSelector {}).
        let one = |port, a| udp(port, port, a, a);
        assert_eq!(
            web[&ip("10.1.0.1")].egress,
            Some(vec![
                one(53, "10.1.0.1"),
                one(5353, "10.1.0.2"),
                one(6000, "10.2.0.1")
            ])
        );
        assert_eq!(
            web[&ip("fd00:1::1")].egress,
            Some(vec![one(53, "fd00:1::1"), one(6000, "fd00:2::1")])
        );
    }

    #[test]
    fn selectors_reach_other_clusters_until_they_expire() {
        let mut e = engine();
        e.upsert_policy(&policy(
            "c1",
            "demo",
            "from-data",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"ports": [{"protocol": "SCTP"}],
                                "from": [{"namespaceSelector": {"matchLabels": {"team": "data"}}}]}]}),
        ));
        let sctp = |a: &str| Grant {
            protocol: Protocol::Sctp,
            ports: (0, u16::MAX),
            peers: AddrRange::single(ip(a)),
        };
        let web = packets_of(&e, "c1", "demo", "web");
        assert_eq!(web[&ip("10.1.0.1")].ingress, Some(vec![sctp("10.2.0.1")]));
        assert_eq!(web[&ip("fd00:1::1")].ingress, Some(vec![sctp("fd00:2::1")]));
        e.set_cluster_expired(&cid("c2"), true);
        let web = packets_of(&e, "c1", "demo", "web");
        assert_eq!(
            web[&ip("10.1.0.1")].ingress,
            Some(vec![]),
            "expired: fails closed"
        );
    }

    #[test]
    fn an_enforce_identity_rule_admits_no_packet_ingress() {
        let mut e = engine();
        let rule = |mode: &str| {
            IdentityPolicy::from_value(
                &cid("c1"),
                json!({"apiVersion": "weft.dev/v1alpha1", "kind": "IdentityPolicy",
                       "metadata": {"name": "ids", "namespace": "demo"},
                       "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "mode": mode,
                                "rules": [{"from": [{"trustDomain": "c1.weft.local"}]}]}}),
            )
            .expect("identity policy")
        };
        e.upsert_identity_policy(&rule("Audit"));
        let web = packets_of(&e, "c1", "demo", "web");
        assert_eq!(
            web[&ip("10.1.0.1")],
            PodPackets::default(),
            "audit enforces nothing"
        );
        e.upsert_identity_policy(&rule("Enforce"));
        let web = packets_of(&e, "c1", "demo", "web");
        assert_eq!(web[&ip("10.1.0.1")].ingress, Some(vec![]));
        assert_eq!(web[&ip("10.1.0.1")].egress, None);
    }

    #[test]
    fn an_address_two_pods_claim_admits_nothing() {
        let mut e = engine();
        e.upsert_pod(&pod("c1", "demo", "copy", &["10.1.0.2"], json!([])));
        let db = packets_of(&e, "c1", "demo", "db");
        let none = PodPackets {
            ingress: Some(vec![]),
            egress: Some(vec![]),
        };
        assert_eq!(db[&ip("10.1.0.2")], none);
    }
}
